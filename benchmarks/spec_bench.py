"""Speculative decoding, measured: each prompt set (below) at each batch size and temperature, with n-gram
speculation off and on, in one engine each; prints a table and writes JSON.

    python -m benchmarks.spec_bench [--model DIR] [--batch 1,16] [--temperature 0,0.7] [--k 4] [--max-tokens 128]

A run sends ``--requests`` prompts of a set in batches of the batch size, one batch after another.  Per run:
output tokens per second per request (a request's tokens over the wall time of its batch, averaged),
and with speculation the acceptance rate (kept / proposed tokens) and the mean tokens a sequence gains per verify
step (1 + kept / drafts).  A run draws with seed 0 per request, so "same" says whether the speculative run gave
the plain run's tokens, as it must.  Without ``--model``: SmolLM2-135M-Instruct (``nanovllm.tools.default_model``).

The prompt sets: *copy-heavy* rewrites, quotes or lightly edits a passage, paragraphs of the licence texts Debian
ships in /usr/share/common-licenses (texts no one on this project wrote; their terms allow verbatim copies), kept
here so a machine without that directory runs the same prompts (``--build-passages`` prints them again); *open*
asks questions with no passage, whose answers repeat little of their prompt.
"""
import argparse
import json
import time
from pathlib import Path

from nanovllm import LLM, SamplingParams


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
    """One prompt per passage, the tasks in turn."""
    return [TASKS[i % len(TASKS)].format(p) for i, p in enumerate(PASSAGES)]


PASSAGES = (
    '"Legal Entity" shall mean the union of the acting entity and all other entities that control, are '
    'controlled by, or are under common control with that entity. For the purposes of this definition, '
    '"control" means (i) the power, direct or indirect, to cause the direction or management of such '
    'entity, whether by contract or otherwise, or (ii) ownership of fifty percent (50%) or more of the '
    'outstanding shares, or (iii) beneficial ownership of such entity.',
    '"Derivative Works" shall mean any work, whether in Source or Object form, that is based on (or '
    'derived from) the Work and for which the editorial revisions, annotations, elaborations, or other '
    'modifications represent, as a whole, an original work of authorship. For the purposes of this '
    'License, Derivative Works shall not include works that remain separable from, or merely link (or '
    'bind by name) to the interfaces of, the Work and Derivative Works thereof.',
    'The licenses for most software and other practical works are designed to take away your freedom to '
    'share and change the works. By contrast, the GNU General Public License is intended to guarantee '
    'your freedom to share and change all versions of a program--to make sure it remains free software '
    'for all its users. We, the Free Software Foundation, use the GNU General Public License for most of '
    'our software; it applies also to any other work released this way by its authors. You can apply it '
    'to your programs, too.',
    'When we speak of free software, we are referring to freedom, not price. Our General Public Licenses '
    'are designed to make sure that you have the freedom to distribute copies of free software (and '
    'charge for them if you wish), that you receive source code or can get it if you want it, that you '
    'can change the software or use pieces of it in new free programs, and that you know you can do these'
    ' things.',
    '1.14. "You" (or "Your") means an individual or a legal entity exercising rights under this License. '
    'For legal entities, "You" includes any entity that controls, is controlled by, or is under common '
    'control with You. For purposes of this definition, "control" means (a) the power, direct or '
    'indirect, to cause the direction or management of such entity, whether by contract or otherwise, or '
    '(b) ownership of more than fifty percent (50%) of the outstanding shares or beneficial ownership of '
    'such entity.',
    'All distribution of Covered Software in Source Code Form, including any Modifications that You '
    'create or to which You contribute, must be under the terms of this License. You must inform '
    'recipients that the Source Code Form of the Covered Software is governed by the terms of this '
    'License, and how they can obtain a copy of this License. You may not attempt to alter or restrict '
    "the recipients' rights in the Source Code Form.",
    'The object code form of an Application may incorporate material from a header file that is part of '
    'the Library. You may convey such object code under terms of your choice, provided that, if the '
    'incorporated material is not limited to numerical parameters, data structure layouts and accessors, '
    'or small macros, inline functions and templates (ten or fewer lines in length), you do both of the '
    'following:',
    '0) Convey the Minimal Corresponding Source under the terms of this License, and the Corresponding '
    'Application Code in a form suitable for, and under terms that permit, the user to recombine or '
    'relink the Application with a modified version of the Linked Version to produce a modified Combined '
    'Work, in the manner specified by section 6 of the GNU GPL for conveying Corresponding Source.',
    'The intent of this document is to state the conditions under which a Package may be copied, such '
    'that the Copyright Holder maintains some semblance of artistic control over the development of the '
    'package, while giving the users of the package the right to use and distribute the Package in a '
    'more-or-less customary fashion, plus the right to make reasonable modifications.',
    '5. You may charge a reasonable copying fee for any distribution of this Package. You may charge any '
    'fee you choose for support of this Package. You may not charge a fee for this Package itself. '
    'However, you may distribute this Package in aggregate with other (possibly commercial) programs as '
    'part of a larger (possibly commercial) software distribution provided that you do not advertise this'
    " Package as a product of your own. You may embed this Package's interpreter within an executable of "
    'yours (by linking); this shall be construed as a mere form of aggregation, provided that the '
    'complete Standard Version of the interpreter is so embedded.',
    'The purpose of this License is to make a manual, textbook, or other functional and useful document '
    '"free" in the sense of freedom: to assure everyone the effective freedom to copy and redistribute '
    'it, with or without modifying it, either commercially or noncommercially. Secondarily, this License '
    'preserves for the author and publisher a way to get credit for their work, while not being '
    'considered responsible for modifications made by others.',
    'We have designed this License in order to use it for manuals for free software, because free '
    'software needs free documentation: a free program should come with manuals providing the same '
    'freedoms that the software does. But this License is not limited to software manuals; it can be used'
    ' for any textual work, regardless of subject matter or whether it is published as a printed book. We'
    ' recommend this License principally for works whose purpose is instruction or reference.',
    'CREATIVE COMMONS CORPORATION IS NOT A LAW FIRM AND DOES NOT PROVIDE LEGAL SERVICES. DISTRIBUTION OF '
    'THIS DOCUMENT DOES NOT CREATE AN ATTORNEY-CLIENT RELATIONSHIP. CREATIVE COMMONS PROVIDES THIS '
    'INFORMATION ON AN "AS-IS" BASIS. CREATIVE COMMONS MAKES NO WARRANTIES REGARDING THE USE OF THIS '
    'DOCUMENT OR THE INFORMATION OR WORKS PROVIDED HEREUNDER, AND DISCLAIMS LIABILITY FOR DAMAGES '
    'RESULTING FROM THE USE OF THIS DOCUMENT OR THE INFORMATION OR WORKS PROVIDED HEREUNDER.',
    'Certain owners wish to permanently relinquish those rights to a Work for the purpose of contributing'
    ' to a commons of creative, cultural and scientific works ("Commons") that the public can reliably '
    'and without fear of later claims of infringement build upon, modify, incorporate in other works, '
    'reuse and redistribute as freely as possible in any form whatsoever and for any purposes, including '
    'without limitation commercial purposes. These owners may contribute to the Commons to promote the '
    'ideal of a free culture and the further production of creative, cultural and scientific works, or to'
    ' gain reputation or greater distribution for their Work in part through the use and efforts of '
    'others.',
    'Redistribution and use in source and binary forms, with or without modification, are permitted '
    'provided that the following conditions are met: 1. Redistributions of source code must retain the '
    'above copyright notice, this list of conditions and the following disclaimer. 2. Redistributions in '
    'binary form must reproduce the above copyright notice, this list of conditions and the following '
    'disclaimer in the documentation and/or other materials provided with the distribution. 3. Neither '
    'the name of the University nor the names of its contributors may be used to endorse or promote '
    'products derived from this software without specific prior written permission.',
    "THIS SOFTWARE IS PROVIDED BY THE REGENTS AND CONTRIBUTORS ``AS IS'' AND ANY EXPRESS OR IMPLIED "
    'WARRANTIES, INCLUDING, BUT NOT LIMITED TO, THE IMPLIED WARRANTIES OF MERCHANTABILITY AND FITNESS FOR'
    ' A PARTICULAR PURPOSE ARE DISCLAIMED. IN NO EVENT SHALL THE REGENTS OR CONTRIBUTORS BE LIABLE FOR '
    'ANY DIRECT, INDIRECT, INCIDENTAL, SPECIAL, EXEMPLARY, OR CONSEQUENTIAL DAMAGES (INCLUDING, BUT NOT '
    'LIMITED TO, PROCUREMENT OF SUBSTITUTE GOODS OR SERVICES; LOSS OF USE, DATA, OR PROFITS; OR BUSINESS '
    'INTERRUPTION) HOWEVER CAUSED AND ON ANY THEORY OF LIABILITY, WHETHER IN CONTRACT, STRICT LIABILITY, '
    'OR TORT (INCLUDING NEGLIGENCE OR OTHERWISE) ARISING IN ANY WAY OUT OF THE USE OF THIS SOFTWARE, EVEN'
    ' IF ADVISED OF THE POSSIBILITY OF SUCH DAMAGE.',
)


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",")]


def run(llm: LLM, prompts: list[list[int]], batch: int, temperature: float, max_tokens: int):
    """(token ids per request, seconds a request waited on average for its batch, the engine's speculation
    counters) of ``prompts`` in batches of ``batch``, one after another."""
    params = SamplingParams(temperature=temperature, seed=0, max_tokens=max_tokens)
    llm.engine.reset_stats()
    tokens, seconds = [], 0.0
    for lo in range(0, len(prompts), batch):
        start = time.perf_counter()
        tokens += [o["token_ids"] for o in llm.generate(prompts[lo:lo + batch], params, use_tqdm=False)]
        seconds += time.perf_counter() - start
    return tokens, seconds, {k: v for k, v in llm.engine.stats.items() if k.startswith("spec")}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None)
    p.add_argument("--batch", default="1,16", help="comma-separated batch sizes")
    p.add_argument("--temperature", default="0,0.7", help="comma-separated temperatures")
    p.add_argument("--k", type=int, default=4, help="num_speculative_tokens")
    p.add_argument("--lookup-max", type=int, default=4, help="prompt_lookup_max")
    p.add_argument("--lookup-min", type=int, default=1, help="prompt_lookup_min")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--requests", type=int, default=16, help="requests per set (at least one batch), in batches")
    p.add_argument("--enforce-eager", action="store_true")
    p.add_argument("--json", default=None, help="write the rows here")
    p.add_argument("--build-passages", action="store_true", help=f"print PASSAGES anew from {LICENSES} and stop")
    args = p.parse_args()
    if args.build_passages:
        print(json.dumps(build_passages(), indent=1))
        return
    if args.model is None:
        from nanovllm.tools.default_model import default_model_path
        args.model = str(default_model_path())
    spec = {"method": "ngram", "num_speculative_tokens": args.k, "prompt_lookup_max": args.lookup_max,
            "prompt_lookup_min": args.lookup_min}
    runs = {}  # (set, batch, temperature, mode) -> run's outputs; one engine at a time holds the device
    for mode, extra in (("off", {}), ("ngram", {"speculative_config": spec})):
        llm = LLM(args.model, enforce_eager=args.enforce_eager, **extra)
        chat = llm.apply_chat_template
        sets = {"copy-heavy": [chat([{"role": "user", "content": t}]) for t in copy_heavy()],
                "open": [chat([{"role": "user", "content": t}]) for t in OPEN]}
        for name, prompts in sets.items():
            for batch in (int(b) for b in args.batch.split(",")):
                chosen = (prompts * (-(-batch // len(prompts))))[:max(batch, args.requests)]
                for temperature in _floats(args.temperature):
                    runs[name, batch, temperature, mode] = run(llm, chosen, batch, temperature, args.max_tokens)
        llm.close()
    rows = []
    for (name, batch, temperature, mode), (plain, plain_s, _) in runs.items():
        if mode != "off":
            continue
        ours, spec_s, stats = runs[name, batch, temperature, "ngram"]
        off = sum(len(t) for t in plain) / batch / plain_s
        on = sum(len(t) for t in ours) / batch / spec_s
        proposed, drafts = stats["spec_proposed_tokens"], stats["spec_drafts"]
        rows.append(dict(set=name, batch=batch, temperature=temperature, k=args.k, same=plain == ours,
                         off_tok_s=round(off, 1), ngram_tok_s=round(on, 1), speedup=round(on / off, 3),
                         acceptance=round(stats["spec_accepted_tokens"] / proposed, 3) if proposed else 0.0,
                         tokens_per_step=round(1 + stats["spec_accepted_tokens"] / drafts, 3) if drafts else 1.0,
                         accepted_by_position=stats["spec_accepted_by_position"],
                         proposed_by_position=stats["spec_proposed_by_position"]))
    print("| set | batch | temperature | off tok/s/req | n-gram tok/s/req | speed-up | acceptance | tokens/step | same |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['set']} | {r['batch']} | {r['temperature']} | {r['off_tok_s']} | {r['ngram_tok_s']} | "
              f"{r['speedup']}x | {r['acceptance']} | {r['tokens_per_step']} | {r['same']} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": args.model, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
