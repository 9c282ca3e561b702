"""Write the E2E development set as chat conversations (OpenAI's fine-tuning format), for the chat
job (jobs/smollm2-chat.yaml):

    python bench/e2e_chat_data.py            # writes jobs/data/e2e/devset-chat.jsonl

One conversation per row of jobs/data/e2e/devset.csv, the same rows in the same order (as
``sources.read_e2e`` reads them): the user turn is the meaning representation in
``chat.E2E_CHAT_PROMPT`` (what evaluation prompts a chat adapter with), the assistant turn the
reference. No system turn: the model's template supplies its own where it has one.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "jobs" / "data" / "e2e" / "devset.csv"
OUT = REPO / "jobs" / "data" / "e2e" / "devset-chat.jsonl"


def conversations(csv_path: Path) -> list[dict]:
    from lora_dist.chat import E2E_CHAT_PROMPT
    from lora_dist.sources import read_e2e, render

    return [{"messages": [{"role": "user", "content": render(E2E_CHAT_PROMPT, e.mr)},
                          {"role": "assistant", "content": e.completion.strip()}]} for e in read_e2e(csv_path)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    rows = conversations(args.data)
    args.out.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    print(f"{len(rows)} conversations written to {args.out}")


if __name__ == "__main__":
    main()
