"""What the benchmark programs and bench.py share: where results go, the default checkpoint, nano-vllm's bench
workload, the engine arguments of one bench run, and the one set of GPU timers.

Timers (CUDA only; each synchronises before it returns):

* ``cuda_ms(fn)``: milliseconds per call of ``fn``, timed with CUDA events around ``reps`` back-to-back calls.
* ``graph_us(calls)``: microseconds per call of a list of thunks captured in one CUDA graph and replayed (no
  launch overhead; give each thunk its own buffers where the data would otherwise stay in L2).
* ``copy_bandwidth(device)``: bytes read + written per second by a large device-to-device copy, the practical
  memory ceiling every bandwidth-bound number here is compared with.

``decode_floor_seconds`` is the decode byte floor of docs/PERFORMANCE.md: each decode step reads the weights
once and every running sequence's KV, at copy bandwidth.  In a mixture of experts a step reads only the experts
its tokens were routed to: ``step_weight_bytes`` counts the expected share under uniform routing (random weights
route close to uniformly; a real checkpoint's skew touches fewer experts, so its floor is lower).

Speculative decoding's prompt sets (``offline_bench.py speculative``): *copy-heavy* prompts rewrite, quote or
lightly edit a passage, paragraphs of the licence texts Debian ships in /usr/share/common-licenses (texts no one on
this project wrote; their terms allow verbatim copies), kept here so a machine without that directory runs the same
prompts (``build_passages`` reads them again); *open* prompts ask questions with no passage.
"""
import json
import os
from pathlib import Path
from random import randint, seed

MIN_LEN = 100  # nano-vllm draws prompt and output lengths from randint(100, max)


def out_dir() -> str:
    """``$OUT`` (the GPU tool's result folder) or ./results, created."""
    path = os.environ.get("OUT", "results")
    os.makedirs(path, exist_ok=True)
    return path


def positive_ints(text: str, flag: str) -> list[int]:
    """``text`` as comma-separated positive ints, or exit naming ``flag`` and the bad value."""
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise SystemExit(f"{flag} must be comma-separated ints, got {text!r}")
    if not values or min(values) < 1:
        raise SystemExit(f"{flag} must be positive, got {text!r}")
    return values


def write_json(name: str, obj) -> str:
    """Write ``obj`` as ``<out_dir>/<name>`` (what JSON cannot hold as its ``str``) and return the path."""
    path = os.path.join(out_dir(), name)
    with open(path, "w") as f:
        json.dump(obj, f, indent=1, default=str)
    return path


def default_model() -> str:
    """bench.py's default checkpoint: a random-weight bf16 Qwen3-0.6B, synthesized once and cached."""
    from nanovllm.tools.synthesize import cached_synthetic
    return str(cached_synthetic("qwen3-0.6b", dtype="bfloat16"))


def workload(num_seqs: int, max_input_len: int, max_output_len: int):
    """nano-vllm's bench workload, ``(prompts, params)``: ``random.seed(0)``; prompts ``[[randint(0, 10000) for _
    in range(randint(100, max_input_len))] ...]``, then ``max_tokens=randint(100, max_output_len)`` per sequence, in
    that order; temperature 0.6, ignore_eos."""
    from nanovllm import SamplingParams
    seed(0)
    prompts = [[randint(0, 10000) for _ in range(randint(MIN_LEN, max_input_len))] for _ in range(num_seqs)]
    params = [SamplingParams(temperature=0.6, ignore_eos=True, max_tokens=randint(MIN_LEN, max_output_len))
              for _ in range(num_seqs)]
    return prompts, params


_FIELDS = [("name", {"type": "string", "maxLength": 32}), ("age", {"type": "integer", "minimum": 0, "maximum": 150}),
           ("score", {"type": "number"}), ("active", {"type": "boolean"}),
           ("city", {"type": "string", "enum": ["Paris", "Rome", "Oslo", "Lima", "Pune"]}),
           ("email", {"type": "string", "maxLength": 40}), ("count", {"type": "integer"}),
           ("tag", {"type": "string", "maxLength": 16})]


def json_schema(i: int) -> dict:
    """Request ``i``'s JSON schema in the structured-output workloads: an object of 4 to 6 required typed fields
    (strings of bounded length, an enum, integers, a number, a boolean), 24 distinct schemas in turn."""
    fields = [_FIELDS[(i + j) % len(_FIELDS)] for j in range(4 + i % 3)]
    return {"type": "object", "properties": dict(fields), "required": [name for name, _ in fields],
            "additionalProperties": False}


def llm_kwargs(args, bs: int) -> dict:
    """``LLM(...)`` keyword arguments of one run: the engine flags of ``args`` (``nanovllm.cli``),
    ``max_num_seqs=bs`` and the given decode buckets up to ``bs`` (the defaults if none is left)."""
    from nanovllm.cli import engine_kwargs
    kwargs = dict(engine_kwargs(args), max_num_seqs=bs)
    if kwargs.get("graph_batch_sizes"):
        kwargs["graph_batch_sizes"] = [b for b in kwargs["graph_batch_sizes"] if b <= bs] or None
    return kwargs


def decode_floor_seconds(decode_steps: int, decode_kv_tokens: int, weight_bytes: int, kv_bytes_per_token: int,
                         bandwidth: float) -> float:
    """Seconds the decode steps need at least: weights once per step plus every KV token read, over
    ``bandwidth`` bytes per second."""
    if bandwidth <= 0:
        raise ValueError(f"bandwidth must be positive, got {bandwidth}")
    return (decode_steps * weight_bytes + decode_kv_tokens * kv_bytes_per_token) / bandwidth


def step_weight_bytes(batch: int, weight_bytes: int, expert_bytes: int = 0, expert_share: float = 0.0) -> float:
    """Expected weight bytes a decode step of ``batch`` sequences reads: every weight that is not a routed
    expert, plus each expert with the probability that at least one of the ``batch`` tokens picks it, where a
    token picks a given expert with probability ``expert_share`` (top_k / experts)."""
    if not 0.0 <= expert_share <= 1.0 or not 0 <= expert_bytes <= weight_bytes:
        raise ValueError(f"expert_share={expert_share} must lie in [0, 1] and expert_bytes={expert_bytes} in "
                         f"[0, weight_bytes={weight_bytes}]")
    return weight_bytes - expert_bytes + expert_bytes * (1.0 - (1.0 - expert_share) ** batch)


def cuda_ms(fn, reps: int = 10, warmup: int = 2) -> float:
    """Milliseconds per call of ``fn`` on the current CUDA stream (CUDA events around ``reps`` calls)."""
    import torch
    for _ in range(warmup):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / reps


def graph_us(calls, replays: int = 20) -> float:
    """Microseconds per call of ``calls`` (a list of thunks), captured in one CUDA graph and replayed.

    Each thunk runs once eagerly first, so compiles and allocations happen outside the capture."""
    import torch
    for c in calls:
        c()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for c in calls:
            c()
    return cuda_ms(graph.replay, reps=replays, warmup=3) * 1000 / len(calls)


def copy_bandwidth(device="cuda", nbytes: int = 1 << 30) -> float:
    """Bytes read + written per second by a device-to-device copy of ``nbytes`` (the practical ceiling)."""
    import torch
    a = torch.empty(nbytes, dtype=torch.uint8, device=device)
    b = torch.empty_like(a)
    with torch.cuda.device(a.device):
        ms = cuda_ms(lambda: b.copy_(a), reps=10, warmup=2)
    return 2 * nbytes / (ms / 1000)


# ---- speculative decoding's prompt sets ----
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


def rel_err(got, want) -> float:
    """||got - want|| / ||want||, in float32."""
    return ((got.float() - want.float()).norm() / want.float().norm()).item()
