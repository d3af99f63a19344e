"""The two prompt sets of the speculative-decoding benchmark (``benchmarks/spec_bench.py``), as chat messages.

*copy-heavy*: rewrite, quote or lightly edit a passage; the passages are paragraphs of the licence texts Debian
ships in /usr/share/common-licenses (texts no one on this project wrote; their terms allow verbatim copies),
stored in ``spec_passages.json`` so that a machine without that directory runs the same prompts
(``python -m benchmarks.spec_prompts --build`` writes it again).  *open*: questions with no passage, whose answers
repeat little of their prompt.
"""
import argparse
import json
from pathlib import Path

PASSAGES = Path(__file__).with_name("spec_passages.json")
LICENSES = Path("/usr/share/common-licenses")
SOURCES = ("Apache-2.0", "GPL-3", "MPL-2.0", "LGPL-3", "Artistic", "GFDL-1.3", "CC0-1.0", "BSD")
TASKS = ("Repeat the following passage exactly, word for word:\n\n{}",
         "Rewrite the following passage, replacing every occurrence of \"Licensor\" or \"License\" with "
         "\"Owner\" or \"Terms\", and change nothing else:\n\n{}",
         "Quote the following passage in full, then add one sentence summarising it:\n\n{}",
         "Copy the following passage, fixing only its capitalisation:\n\n{}")
OPEN = ("What causes the seasons on Earth?", "Give three tips for learning a new language.",
        "Why is the sky blue?", "Describe how a bicycle works.", "What is the difference between a virus and a "
        "bacterium?", "Suggest a name for a bakery and explain it.", "How do bees make honey?",
        "Write a short poem about autumn.", "What should I pack for a weekend hike?", "Explain what a prime "
        "number is.", "How does a refrigerator keep food cold?", "Why do we dream?", "Plan a simple dinner for four.",
        "What are the planets of the solar system?", "How do I care for a cactus?", "Tell me a fun fact about "
        "octopuses.")


def build_passages(per_source: int = 2, min_words: int = 60, max_words: int = 160) -> list[str]:
    """Paragraphs of ``min_words`` to ``max_words`` words, ``per_source`` from each licence of ``SOURCES``."""
    passages = []
    for name in SOURCES:
        text = (LICENSES / name).read_text(errors="replace")
        paragraphs = [" ".join(p.split()) for p in text.split("\n\n")]
        passages += [p for p in paragraphs if min_words <= len(p.split()) <= max_words][:per_source]
    return passages


def copy_heavy() -> list[str]:
    """One prompt per stored passage, the tasks in turn."""
    passages = json.loads(PASSAGES.read_text())
    return [TASKS[i % len(TASKS)].format(p) for i, p in enumerate(passages)]


def open_prompts() -> list[str]:
    return list(OPEN)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--build", action="store_true", help=f"write {PASSAGES.name} from {LICENSES}")
    args = p.parse_args()
    if args.build:
        PASSAGES.write_text(json.dumps(build_passages(), indent=1) + "\n")
    print(f"{len(copy_heavy())} copy-heavy prompts, {len(open_prompts())} open ones")


if __name__ == "__main__":
    main()
