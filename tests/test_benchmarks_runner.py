"""The GPU runner's table on the CPU: ``--list``, every step resolving to commands that parse, an unknown step
named in the error with the valid ones, a run's JSON collected into results.json and results.md, a step past its
time limit stopped, a server's end recorded, a preset another lane wrote first taken; and the layout of
benchmarks/ (at most 14 files: one program per workload kind, the runner in three, no sys.path edits, nothing
importing tests/ or bench.py)."""
import dataclasses
import importlib.util
import json
import os
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import gpu  # noqa: E402
from benchmarks.gpu_steps import BY_NAME, STEPS, Command, Context, commands  # noqa: E402
from conftest import ends_within  # noqa: E402

NAMED = ("bench-ours bench-vllm batch1-ours batch1-vllm moe-ours moe-vllm minicpm-ours minicpm-vllm vl-ours vl-vllm "
         "serve-ours serve-vllm offload-ours offload-vllm tp-ours tp-vllm startup-ours parity").split()


def test_list_prints_every_step(capsys):
    assert gpu.main(["--list"]) == []
    out = capsys.readouterr().out
    assert all(f"| {s.name} | {s.engine} | {s.model} |" in out for s in STEPS)


def test_the_named_steps_are_in_the_one_table():
    assert set(NAMED) <= set(BY_NAME) and len(BY_NAME) == len(STEPS)
    assert {s.engine for s in STEPS} == {"ours", "vllm", "tests"}


@pytest.mark.parametrize("name", sorted(BY_NAME))
def test_every_step_resolves_to_commands_that_parse(name, tmp_path):
    import bench
    step = BY_NAME[name]
    ctx = Context(tmp_path / f"{name}-1", ROOT, tmp_path / "peers", Path("/tmp/site"), dry=True)
    cmds = commands(step, ctx)
    assert cmds and all(c.argv[0] == sys.executable for c in cmds)
    for cmd in cmds:
        script = cmd.argv[1]
        if script == "bench.py":
            parser = bench.make_parser()
            bench.check_args(parser, parser.parse_args(cmd.argv[2:]))
        elif script == "-m":
            assert cmd.argv[2].startswith("vllm.") or importlib.util.find_spec(cmd.argv[2]) is not None, cmd.argv
        else:
            assert script == str(tmp_path / "peers" / "peer_vllm.py") and step.engine == "vllm"
    assert (step.engine == "vllm") == (cmds[0].env.get("PYTHONPATH") == "/tmp/site")


@pytest.mark.parametrize("name", ["multiturn-ours", "multiturn-vllm"])
def test_a_serve_step_serves_and_asks_on_the_runners_port(name, tmp_path):
    from benchmarks import serve_bench
    ctx = Context(tmp_path / "run", ROOT, tmp_path / "peers", Path("/tmp/site"), dry=True, port=8123)
    server, *clients = commands(BY_NAME[name], ctx)
    assert server.background == "http://127.0.0.1:8123" and server.argv[server.argv.index("--port") + 1] == "8123"
    args = {c.label: serve_bench.make_parser().parse_args(c.argv[3:]) for c in clients}
    assert {a.base_url for a in args.values()} == {server.background}
    # the chat workload's flags, then each run's own: "alone" holds 4 conversations, one request at a time
    assert args["paced"].multi_turn == (64, 4) and args["alone"].multi_turn == (4, 4)
    assert args["alone"].max_concurrency == 1 and args["burst"].max_concurrency == 0


def test_an_unknown_step_is_named_with_the_valid_ones(capsys):
    with pytest.raises(SystemExit) as e:
        gpu.main(["bench-ours", "bench-ourz"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "unknown step(s) 'bench-ourz'" in err and "valid steps: bench-ours, bench-vllm," in err


def test_a_run_is_collected_into_results(monkeypatch, tmp_path):
    write = "import json, os; json.dump({'tok_s': 1234.5, 'init_s': 9.5}, open(os.environ['OUT'] + '/r.json', 'w'))"
    monkeypatch.setattr(gpu, "commands", lambda step, ctx: [Command([sys.executable, "-c", write])])
    gpu.main(["bench-vllm", "bench-vllm", "--out", str(tmp_path), "--env", "X=1"])
    records = json.loads((tmp_path / "results.json").read_text())
    assert [r["run"] for r in records] == ["bench-vllm-1", "bench-vllm-2"]
    assert records[0]["rc"] == 0 and records[0]["env"] == {"X": "1"}
    assert records[0]["results"] == {"r.json": {"tok_s": 1234.5, "init_s": 9.5}}
    assert "| bench-vllm-2 | vllm | default | 0 |" in (tmp_path / "results.md").read_text()
    assert "1,234 tok/s, init 9.5 s" in (tmp_path / "results.md").read_text()


def test_a_step_past_its_time_limit_is_stopped(monkeypatch, tmp_path):
    monkeypatch.setitem(gpu.BY_NAME, "parity", dataclasses.replace(BY_NAME["parity"], limit_s=1))
    monkeypatch.setattr(gpu, "commands", lambda step, ctx: [
        Command([sys.executable, "-c", "print('started', flush=True); import time; time.sleep(60)"])])
    [record] = gpu.main(["parity", "--out", str(tmp_path)])
    assert record["rc"] == "timeout" and record["seconds"] < 30 and record["log_tail"] == "started"


SERVER = """
import http.server, signal, sys
class Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200); self.end_headers()
signal.signal(signal.SIGTERM, lambda *_: sys.exit(3))
http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), Health).serve_forever()
"""


def test_a_servers_end_is_recorded(monkeypatch, tmp_path):
    from conftest import free_port
    port = free_port()
    monkeypatch.setattr(gpu, "commands", lambda step, ctx: [
        Command([sys.executable, "-c", SERVER, str(port)], background=f"http://127.0.0.1:{port}", label="server"),
        Command([sys.executable, "-c", "print('client')"], label="client")])
    [record] = gpu.main(["serve-ours", "--out", str(tmp_path)])
    assert record["rc"] == 0 and record["rcs"] == [0]
    assert record["server"][0].startswith("exit status 3 ") and record["server"][0].endswith("after SIGTERM")


def test_a_step_ends_when_the_runner_is_killed(tmp_path):
    """The runner killed from outside (SIGKILL: no ``finally`` runs) takes its step's command with it."""
    import signal
    import subprocess
    import time
    pid_file = tmp_path / "pid"
    sleeper = f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(120)"
    runner = (f"import sys; from benchmarks import gpu; from benchmarks.gpu_steps import Command; "
              f"gpu.commands = lambda step, ctx: [Command([sys.executable, '-c', {sleeper!r}])]; "
              f"gpu.main(['parity', '--out', {str(tmp_path / 'out')!r}])")
    proc = subprocess.Popen([sys.executable, "-c", runner], cwd=ROOT)
    try:
        deadline = time.monotonic() + 60
        while not pid_file.exists() or not pid_file.read_text():
            assert time.monotonic() < deadline and proc.poll() is None, "the step never started"
            time.sleep(0.1)
        step = int(pid_file.read_text())
        os.kill(proc.pid, signal.SIGKILL)
        assert ends_within(step, 10), "the step outlived its runner by 10 s"
    finally:
        proc.kill()


def _benchmark_files() -> list[Path]:
    return [p for p in (ROOT / "benchmarks").iterdir() if p.name != "__pycache__"]


def test_benchmarks_hold_at_most_fifteen_files():
    assert len(_benchmark_files()) <= 15, sorted(p.name for p in _benchmark_files())


def test_benchmarks_edit_no_sys_path_and_import_neither_tests_nor_bench():
    for path in _benchmark_files() + [ROOT / "bench.py"]:
        text = path.read_text()
        assert "sys.path" not in text, path
        assert not re.search(r"^\s*(from|import) (tests|conftest)\b", text, re.M), path
        if path.parent.name == "benchmarks":
            assert not re.search(r"^\s*(from bench |import bench\b)", text, re.M), path


def test_the_headline_of_a_speculative_run_names_each_cell():
    from benchmarks.gpu import headline
    rows = [{"set": "copy-heavy", "batch": 1, "temperature": 0.0, "mode": mode, "tok_s_per_request": tok_s}
            for mode, tok_s in (("off", 1201.1), ("on", 2139.9))]
    record = {"step": "spec-ours", "results": {"speculative_nanovllm_off_on.json": {
        "speculative_config": {"method": "ngram"}, "rows": rows}}}
    assert headline(record) == ("copy-heavy bs 1 T 0.0 off: 1201.1 tok/s/request, "
                                "copy-heavy bs 1 T 0.0 on: 2139.9 tok/s/request")


def test_the_headline_of_a_serve_run_names_the_prefix_hit_rate():
    from benchmarks.gpu import headline
    run = {"request_rate": 4.0, "output_throughput": 1234.0, "ttft_ms": {"p50": 21.2}, "tpot_ms": {"p50": 3.14},
           "prefix_cache": {"metrics": "vllm", "queried_tokens": 1000, "hit_tokens": 870, "hit_rate": 0.87}}
    record = {"step": "multiturn-vllm", "results": {"paced.json": {"runs": [run]},
                                                    "old.json": {"runs": [dict(run, prefix_cache="unavailable")]}}}
    assert headline(record) == ("rate 4.0: 1,234 tok/s, TTFT p50 21 ms, TPOT p50 3.1 ms, prefix hits 87%; "
                                "rate 4.0: 1,234 tok/s, TTFT p50 21 ms, TPOT p50 3.1 ms")



def test_a_preset_another_lane_wrote_first_is_used_with_its_quantization(monkeypatch, tmp_path):
    """Two lanes synthesizing one preset at once: the one whose ``synthesize`` finds the directory already written
    (exit status 2) goes on with it, and the quantization config is added whichever lane wrote the file."""
    from benchmarks import gpu_models

    def other_lane_won(argv, **kw):
        out = Path(argv[4])
        out.mkdir(parents=True)
        (out / "config.json").write_text(json.dumps({"model_type": "gpt_oss"}))
        return dataclasses.make_dataclass("Done", ["returncode", "args"])(2, argv)

    monkeypatch.setattr(gpu_models, "MODELS", tmp_path)
    monkeypatch.setattr(gpu_models.subprocess, "run", other_lane_won)
    ctx = Context(tmp_path / "run", ROOT, tmp_path / "peers", Path("/tmp/site"))
    path = gpu_models.model_dir(BY_NAME["gptoss20b-mxfp4-ours"], ctx)
    config = json.loads((Path(path) / "config.json").read_text())
    assert config["model_type"] == "gpt_oss" and config["quantization_config"]["quant_method"] == "mxfp4"
    monkeypatch.setattr(gpu_models.subprocess, "run", lambda argv, **kw: dataclasses.make_dataclass(
        "Done", ["returncode", "args"])(2, argv))  # failed, and nothing written: the error stands
    with pytest.raises(gpu_models.subprocess.CalledProcessError):
        gpu_models.model_dir(BY_NAME["gptoss120b-mxfp4-ours"], ctx)
