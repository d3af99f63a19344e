"""Prometheus metrics of the server, named as vLLM names its own with the prefix ``nanovllm:``.

Gauges (read from the engine loop at each scrape): ``num_requests_running``, ``num_requests_waiting`` (sequences:
a request of ``n`` choices counts ``n``), ``kv_cache_usage_perc`` (0 to 1, as vLLM).  Counters:
``prompt_tokens_total``, ``generation_tokens_total``, ``request_success_total{finished_reason}``, and as vLLM's
``prefix_cache_queries`` / ``prefix_cache_hits`` (tokens: the prompt tokens of each sequence admitted, and those of
them served from the prefix cache, whole blocks; first admissions only, not readmissions after preemption nor
sequences that want prompt logprobs, as vLLM; read from the engine's totals at each scrape).  Histograms:
``time_to_first_token_seconds``, ``inter_token_latency_seconds`` (one per token after a sequence's first, so
n - 1 of them; tokens that arrive together share the wait), ``e2e_request_latency_seconds``.  With
speculative decoding, counters as vLLM's: ``spec_decode_num_drafts``, ``spec_decode_num_draft_tokens``,
``spec_decode_num_accepted_tokens``, ``spec_decode_num_accepted_tokens_per_pos{position}``.  Every metric
has a ``model_name`` label.  Each server has its own registry, so several can live in one process (tests).
"""
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
_ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0)
_E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
                480.0, 960.0, 1920.0, 7680.0)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class ServerMetrics:
    def __init__(self, model_name: str, engine_stats):
        """``engine_stats()`` returns ``{"running", "waiting", "kv_cache_usage"}`` and the engine's totals
        (``prefix_cache_queries``, ``prefix_cache_hits``, ``spec_*``; a missing one counts 0) (``EngineLoop.stats``)."""
        self.registry = r = CollectorRegistry()
        self._engine_stats = engine_stats
        labels = ["model_name"]

        def gauge(name, doc):
            return Gauge(f"nanovllm:{name}", doc, labels, registry=r).labels(model_name)

        self.running = gauge("num_requests_running", "Sequences in the running batch.")
        self.waiting = gauge("num_requests_waiting", "Sequences waiting for a batch slot.")
        self.kv_usage = gauge("kv_cache_usage_perc", "Share of KV-cache blocks in use (1 = all).")
        self.prompt_tokens = Counter("nanovllm:prompt_tokens", "Prompt tokens of requests that got a first "
                                     "token (once per request, whatever its n).", labels, registry=r).labels(model_name)
        self.generation_tokens = Counter("nanovllm:generation_tokens", "Tokens generated.", labels,
                                         registry=r).labels(model_name)
        self._success = Counter("nanovllm:request_success", "Finished sequences, by finish reason.",
                                labels + ["finished_reason"], registry=r)
        self._model_name = model_name
        self.ttft = Histogram("nanovllm:time_to_first_token_seconds", "Seconds from arrival to the first token.",
                              labels, buckets=_TTFT_BUCKETS, registry=r).labels(model_name)
        self.itl = Histogram("nanovllm:inter_token_latency_seconds", "Seconds between a sequence's tokens.",
                             labels, buckets=_ITL_BUCKETS, registry=r).labels(model_name)
        self.e2e = Histogram("nanovllm:e2e_request_latency_seconds", "Seconds from arrival to the last token.",
                             labels, buckets=_E2E_BUCKETS, registry=r).labels(model_name)

        # counters of totals the engine keeps (its stats key, the counter's name after "nanovllm:", its doc)
        totals = [("prefix_cache_queries", "prefix_cache_queries", "Prefix cache queries, in terms of number of "
                   "queried tokens."),
                  ("prefix_cache_hits", "prefix_cache_hits", "Prefix cache hits, in terms of number of cached tokens."),
                  ("spec_drafts", "spec_decode_num_drafts", "Sequences verified with a proposal."),
                  ("spec_proposed_tokens", "spec_decode_num_draft_tokens", "Proposed tokens verified."),
                  ("spec_accepted_tokens", "spec_decode_num_accepted_tokens", "Proposed tokens kept.")]
        self._totals = {key: Counter(f"nanovllm:{name}", doc, labels, registry=r).labels(model_name)
                        for key, name, doc in totals}
        self._spec_per_pos = Counter("nanovllm:spec_decode_num_accepted_tokens_per_pos", "Proposed tokens kept, "
                                     "by position in the proposal (0 first).", labels + ["position"], registry=r)
        self._seen: dict = {}  # the engine's totals at the last scrape

    def first_token(self, seconds: float) -> None:
        self.ttft.observe(seconds)

    def prompt(self, tokens: int) -> None:
        self.prompt_tokens.inc(tokens)

    def inter_token(self, seconds: float, tokens: int) -> None:
        """``tokens`` arrived together ``seconds`` after the sequence's previous ones: each waited its share."""
        for _ in range(tokens):
            self.itl.observe(seconds / tokens)

    def generated(self, tokens: int) -> None:
        self.generation_tokens.inc(tokens)

    def finished(self, reason: str, seconds: float) -> None:
        self._success.labels(self._model_name, reason).inc()
        self.e2e.observe(seconds)

    def render(self) -> bytes:
        stats = self._engine_stats()
        self.running.set(stats["running"])
        self.waiting.set(stats["waiting"])
        self.kv_usage.set(stats["kv_cache_usage"])
        totals = {key: stats.get(key, 0) for key in self._totals}
        totals.update(enumerate(stats.get("spec_accepted_by_position", ())))
        for key, total in totals.items():  # the engine keeps totals: count what came since the last scrape
            seen = self._seen.get(key, 0)
            counter = self._totals[key] if key in self._totals else self._spec_per_pos.labels(self._model_name,
                                                                                                str(key))
            counter.inc(total - seen if total >= seen else total)  # below: the engine's stats were reset
            self._seen[key] = total
        return generate_latest(self.registry)
