"""A readable look at a few training rows with the label tokens visibly marked (`finetune preprocess`)."""
from __future__ import annotations

import sys
from typing import Any

PLAIN_MARKS = ("[[", "]]")
ANSI_MARKS = ("\x1b[1;32m", "\x1b[0m")  # bold green on a terminal


def mark_labels(tokenizer: Any, input_ids: list[int], mask: list[int], marks: tuple[str, str] = PLAIN_MARKS) -> str:
    """Decode a row, wrapping each run of label tokens in `marks` (decoded per run, so text stays readable)."""
    out, run, run_mask = [], [], None
    for tok, m in zip(list(input_ids) + [None], list(mask) + [None]):
        if m != run_mask and run:
            text = tokenizer.decode(run, skip_special_tokens=False)
            out.append(f"{marks[0]}{text}{marks[1]}" if run_mask else text)
            run = []
        run_mask = m
        if tok is not None:
            run.append(tok)
    return "".join(out)


def preview(splits: Any, tokenizer: Any, n: int = 3, *, color: bool | None = None) -> str:
    """The first `n` train rows, label spans wrapped in [[ ]] (ANSI green when stdout is a terminal).

    Args:
        splits: DataSplits from build_datasets.
        tokenizer: the tokenizer that built them.
        n: how many rows.
        color: force ANSI on/off; default: on when stdout is a tty.
    """
    color = sys.stdout.isatty() if color is None else color
    marks = ANSI_MARKS if color else PLAIN_MARKS
    blocks = []
    for i in range(min(n, len(splits.train))):
        row = splits.train[i]
        labels = sum(row["assistant_masks"])
        head = (f"--- train row {i} ({row['origin']}, task {row['task']}): {len(row['input_ids'])} tokens, "
                f"{labels} label tokens {'(in color)' if color else 'in [[ ]]'}")
        blocks.append(head + "\n" + mark_labels(tokenizer, row["input_ids"], row["assistant_masks"], marks))
    if not blocks:
        return "(no train rows)"
    return "\n".join(blocks)
