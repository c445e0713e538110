"""Export: GGUF files (planned and checked before writing, k-quants through llama.cpp), the Ollama
Modelfile, and the read-back verification against the merged model. May import every stage above it.
"""
