"""The quick-start block of docs/trainer.md, shared by tests/test_trainer_docs.py and tests/test_online_docs.py."""

import re
from pathlib import Path

TRAINER_MD = Path(__file__).resolve().parent.parent / "docs" / "trainer.md"


def quick_start() -> str:
    text = TRAINER_MD.read_text(encoding="utf-8")
    sections = re.split(r"^## ", text, flags=re.M)
    assert sections[1].startswith("Quick start: a text dataset and a reward function"), sections[1][:80]
    blocks = re.findall(r"^```python\n(.*?)^```", sections[1], flags=re.S | re.M)
    assert len(blocks) == 1
    return blocks[0]
