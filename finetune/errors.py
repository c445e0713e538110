"""Errors meant for people: what was wrong, where, and what to do. The CLI prints them without a traceback."""
from __future__ import annotations


class FinetuneError(Exception):
    """A problem the user can fix (bad input, bad config, missing file)."""


class ConfigError(FinetuneError):
    """One or more config problems, all reported together."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"invalid config ({len(self.problems)} problem{'s' * (len(self.problems) != 1)}):\n{lines}")


class DataError(FinetuneError):
    """A bad data file or row. Message names the file, the line/row and the field."""


def _free_space(path: str) -> str:
    import shutil
    from pathlib import Path

    p = Path(path)
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return f"{shutil.disk_usage(p).free / 2**20:.0f} MiB free on the disk of {p}"
    except OSError:
        return "free space unknown"


def _needed_space(path: str) -> str:
    """A size estimate for what failed to write: the newest finished sibling checkpoint, when there is one."""
    import re
    from pathlib import Path

    m = re.search(r"(.*)/\.tmp-checkpoint-\d+", path)
    if not m:
        return ""
    done = sorted(Path(m.group(1)).glob("checkpoint-*"), key=lambda p: p.stat().st_mtime)
    if not done:
        return ""
    size = sum(f.stat().st_size for f in done[-1].rglob("*") if f.is_file())
    return f"; a checkpoint needs about {size / 2**20:.0f} MiB ({done[-1].name}), the last good one is kept"


def user_message(exc: BaseException) -> str | None:
    """One line for a person from an error at a boundary (disk, files, permissions, encodings), or None when the
    error is a bug that should keep its traceback. Used by finetune.cli.user_errors."""
    import errno

    if isinstance(exc, FinetuneError):
        return str(exc)
    where = getattr(exc, "filename", None) or ""
    disk_full = (isinstance(exc, OSError) and exc.errno == errno.ENOSPC) or (
        # torch.save's C++ writer reports a full disk as these RuntimeErrors, without errno or file name
        isinstance(exc, RuntimeError) and any(s in str(exc) for s in ("basic_ios::clear", "PytorchStreamWriter"))
        # the tokenizers library (Rust) raises a plain Exception with the OS error in its text
        or "No space left on device" in str(exc) or "os error 28" in str(exc))
    if disk_full:
        target = where or "the output folder"
        return (f"disk full while writing {target} ({_free_space(where or '.')}{_needed_space(str(where))}); "
                "nothing half-written was published. Free some space (or write elsewhere: hydra.run.dir=..., "
                "merge.output=...) and run the same command again")
    if isinstance(exc, PermissionError):
        return f"{where or exc}: permission denied; make it readable/writable for you, or choose another path"
    if isinstance(exc, IsADirectoryError):
        return f"{where}: is a directory, a file was expected there; give a file path"
    if isinstance(exc, NotADirectoryError):
        return f"{where}: a path component is a file, a folder was expected; choose another path"
    if isinstance(exc, FileExistsError):
        return f"{where}: already exists and is in the way (a file where a folder belongs?); move it or choose another path"
    if isinstance(exc, UnicodeDecodeError):
        return (f"a text file is not UTF-8 ({exc.reason} at byte {exc.start}); re-save it as UTF-8 "
                "(e.g. iconv -f latin1 -t utf-8)")
    if type(exc).__name__ == "SafetensorError" or "HeaderTooLarge" in str(exc) or "incomplete metadata" in str(exc):
        return (f"a .safetensors file is damaged ({str(exc).splitlines()[0][:200]}); download or write it again "
                "(for a run artifact: run the command that makes it, e.g. finetune merge ... merge.overwrite=true)")
    return None
