"""Eval group: post-training checks, base-vs-tuned comparison, benchmarks, and the gates that fail a run."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional

# Gates on rates in [0, 1]; chrf is on sacrebleu's 0-100 scale; max_* gates are upper bounds.
RATE_GATES = ("exact_match", "normalized_match", "json_valid_rate", "schema_valid_rate", "field_precision",
              "field_recall", "field_f1", "stopped_rate")


@dataclass
class EvalGates:
    """Thresholds on the tuned model's metrics; null = no gate. A typo in a name fails at compose time.

    Every gate is a minimum except those named max_<metric>, which are maxima (lower is better there).
    """
    exact_match: Optional[float] = field(default=None, metadata={"help": "min share of rows equal to the target"})
    normalized_match: Optional[float] = field(default=None, metadata={"help": "min share equal after normalising"})
    json_valid_rate: Optional[float] = field(default=None, metadata={"help": "min share of structured rows that parse"})
    schema_valid_rate: Optional[float] = field(default=None, metadata={"help": "min share valid under the row schema"})
    field_precision: Optional[float] = None
    field_recall: Optional[float] = None
    field_f1: Optional[float] = field(default=None, metadata={"help": "min micro F1 over flattened JSON fields"})
    chrf: Optional[float] = field(default=None, metadata={"help": "min corpus chrF (0-100) of free-text rows"})
    stopped_rate: Optional[float] = field(default=None, metadata={"help": "min share ending at end-of-turn"})
    max_target_loss: Optional[float] = field(default=None, metadata={"help": "max mean loss on target tokens"})
    max_target_perplexity: Optional[float] = field(default=None, metadata={"help": "max perplexity on targets"})

    def active(self) -> Dict[str, float]:
        """The gates that are set: name -> threshold."""
        return {k: v for k, v in self.__dict__.items() if v is not None}

    def problems(self) -> list[str]:
        out = []
        for name, value in self.active().items():
            if name in RATE_GATES and not 0 <= value <= 1:
                out.append(f"eval.gates.{name}={value}: a rate, must be in [0, 1]")
            elif name == "chrf" and not 0 <= value <= 100:
                out.append(f"eval.gates.chrf={value}: chrF is on a 0-100 scale")
            elif name.startswith("max_") and value <= 0:
                out.append(f"eval.gates.{name}={value}: must be positive")
        return out


@dataclass
class EvalConfig:
    enabled: bool = field(default=True, metadata={"help": "Evaluate at the end of `finetune train`."})
    max_samples: Optional[int] = field(default=None, metadata={"help": "Score only the first N val rows."})
    max_new_tokens: int = 256
    batch_size: int = field(default=16, metadata={"help": "Rows per generation / benchmark batch."})
    do_sample: bool = field(default=False, metadata={"help": "Sample instead of greedy decoding (seeded)."})
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = field(default=0, metadata={"help": "torch seed set before sampling, for repeatable scores."})
    constrain: str = field(default="none", metadata={"help": "none | json_schema (structured rows only)"})
    compare_base: bool = field(default=True, metadata={"help": "Also score the base model without the adapter."})
    base_cache: bool = field(default=True, metadata={
        "help": "Reuse the base's scores from an earlier run with the same base, rows, settings and code."})
    loss: bool = field(default=True, metadata={"help": "Loss and perplexity on the label tokens of each row."})
    loss_tokens_per_batch: int = field(
        default=4096, metadata={"help": "Padded tokens per loss forward; bounds the logits' memory."})
    examples: int = field(default=3, metadata={"help": "Best and worst rows shown in report.md."})
    checkpoints: bool = field(
        default=False, metadata={"help": "Also score every checkpoints/checkpoint-N and plot metrics vs step."})
    gates: EvalGates = field(
        default_factory=EvalGates, metadata={"help": "e.g. eval.gates.exact_match=0.9; a miss exits non-zero."})
    # lm-evaluation-harness bridge (optional extra: pip install 'finetune[eval]'); eval=lm_harness sets these.
    tasks: List[str] = field(default_factory=list, metadata={
        "help": "lm-eval tasks on the merged model, e.g. [mmlu,gsm8k]; finetune_demo_* are local and offline."})
    task_paths: List[str] = field(default_factory=list, metadata={"help": "Folders of your own lm-eval task YAML."})
    num_fewshot: Optional[int] = None
    limit: Optional[float] = field(default=None, metadata={"help": "Docs per task (N, or a fraction < 1)."})
    apply_chat_template: bool = field(default=True, metadata={"help": "Render benchmark prompts as chat turns."})
    allow_code_execution: bool = field(
        default=False, metadata={"help": "Needed by tasks that run model-written code (humaneval, mbpp)."})

    def problems(self) -> list[str]:
        out = []
        if self.constrain not in ("none", "json_schema"):
            out.append(f"eval.constrain={self.constrain!r}: use none or json_schema")
        # 8192 as generate.max_new_tokens (Qwen2.5's generation limit): 1e8 was accepted and then ran for hours.
        if not 0 < self.max_new_tokens <= 8192:
            out.append(f"eval.max_new_tokens={self.max_new_tokens}: must be in 1..8192")
        for name in ("batch_size", "loss_tokens_per_batch"):
            if getattr(self, name) <= 0:
                out.append(f"eval.{name}={getattr(self, name)}: must be positive")
        if self.do_sample and not (self.temperature > 0 and 0 < self.top_p <= 1):
            out.append(f"eval.temperature={self.temperature} / eval.top_p={self.top_p}: need temperature > 0 "
                       "and top_p in (0, 1] when eval.do_sample=true")
        if self.max_samples is not None and self.max_samples <= 0:
            out.append(f"eval.max_samples={self.max_samples}: must be positive (or null for all rows)")
        if self.examples < 0:
            out.append(f"eval.examples={self.examples}: must be 0 or more")
        if self.limit is not None and self.limit <= 0:
            out.append(f"eval.limit={self.limit}: must be positive (a count, or a fraction below 1)")
        if self.num_fewshot is not None and self.num_fewshot < 0:
            out.append(f"eval.num_fewshot={self.num_fewshot}: must be 0 or more")
        return out + self.gates.problems()
