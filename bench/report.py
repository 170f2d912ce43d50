"""The verdicts, the printed table, results.json and the PNG chart."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Target:
    id: str
    name: str
    figure: str
    required: str
    passed: bool | None  # None: not measured
    spread: str = ""  # lowest to highest over the rounds
    cpu: str = ""  # server CPU per request, and the baseline's


def _spread(rounds: Any, key: str, fmt: str = "{:.2f}x") -> str:
    values = [r[key] for r in rounds or () if isinstance(r, dict) and _ok(r.get(key))]
    if len(values) < 2:
        return ""
    return f"{fmt.format(min(values))} to {fmt.format(max(values))}"


def _cpu(cpu: Any, *names: str) -> str:
    if not isinstance(cpu, dict) or not all(_ok(cpu.get(n)) for n in names):
        return ""
    return ", ".join(f"{n.replace('_', ' ')} {cpu[n]:,.0f} µs" for n in names)


def _get(results: dict[str, Any], *path: str) -> Any:
    value: Any = results
    for key in path:
        if not isinstance(value, dict) or key not in value:
            return None
        value = value[key]
    return value


def _ok(value: Any) -> bool:
    return isinstance(value, (int, float)) and not math.isnan(value)


def targets(results: dict[str, Any]) -> list[Target]:
    """Each target of issue 5, judged on the figures in `results`."""
    out: list[Target] = []

    def ratio(
        tid: str,
        name: str,
        path: tuple[str, ...],
        limit: float,
        *,
        most: bool = False,
        cpu: str = "",
    ) -> None:
        value = _get(results, *path)
        if not _ok(value):
            out.append(Target(tid, name, "not measured", f"{'<=' if most else '>='} {limit}", None))
            return
        passed = value <= limit if most else value >= limit
        spread = _spread(_get(results, path[0], "rounds"), path[-1])
        required = f"{'<=' if most else '>='} {limit:.2f}x"
        out.append(Target(tid, name, f"{value:.2f}x", required, passed, spread, cpu))

    protected_cpu = _get(results, "protected", "cpu_us_per_request")
    ratio(
        "1a",
        "/protected, reused token / bare FastAPI",
        ("protected", "reused_ratio"),
        0.80,
        cpu=_cpu(protected_cpu, "reused", "bare"),
    )
    ratio(
        "1b",
        "/protected, fresh token / bare FastAPI",
        ("protected", "fresh_ratio"),
        0.55,
        cpu=_cpu(protected_cpu, "fresh", "bare"),
    )
    ratio(
        "1c",
        "/protected, DPoP token + fresh proof / bare FastAPI",
        ("dpop-protected", "ratio"),
        0.45,
    )
    ratio("2a", "/login (bcrypt 12) / bcrypt bound", ("login", "login_ratio"), 0.85)
    ratio("2b", "/protected p99 under logins / idle", ("login", "p99_ratio"), 2.0, most=True)
    for backend in ("sqlite", "postgresql"):
        value = _get(results, "refresh", backend, "ratio")
        errors = _get(results, "refresh", backend, "errors")
        if not _ok(value):
            reason = _get(results, "refresh", backend, "skipped") or "not measured"
            name = f"/refresh / sign-only app, {backend}"
            out.append(Target("3", name, reason, ">= 0.50x", None))
            continue
        out.append(
            Target(
                "3",
                f"/refresh / sign-only app, {backend}, 32 clients",
                f"{value:.2f}x, {errors} errors",
                ">= 0.50x, 0 errors",
                value >= 0.50 and errors == 0,
                _spread(_get(results, "refresh", backend, "rounds"), "ratio"),
                _cpu(_get(results, "refresh", backend, "cpu_us_per_request"), "refresh", "sign"),
            )
        )
    for backend in ("sqlite", "postgresql"):
        for key, name, limit, peer in (
            ("client_credentials", "client_credentials / sign-only /token", 0.85, "sign"),
            ("introspect", "introspection, valid token / bare", 0.60, "bare"),
        ):
            value = _get(results, "clients", backend, f"{key}_ratio")
            label = f"{name}, {backend}"
            if not _ok(value):
                reason = _get(results, "clients", backend, "skipped") or "not measured"
                out.append(Target("6", label, reason, f">= {limit:.2f}x, 0 errors", None))
                continue
            errors = _get(results, "clients", backend, "errors", key)
            out.append(
                Target(
                    "6",
                    label,
                    f"{value:.2f}x, {errors} errors",
                    f">= {limit:.2f}x, 0 errors",
                    value >= limit and errors == 0,
                    _spread(_get(results, "clients", backend, "rounds"), f"{key}_ratio"),
                    _cpu(_get(results, "clients", backend, "cpu_us_per_request"), key, peer),
                )
            )
    value = _get(results, "dpop-refresh", "ratio")
    if _ok(value):
        errors = _get(results, "dpop-refresh", "errors")
        out.append(
            Target(
                "3c",
                "/refresh, DPoP-bound + fresh proof / sign-only app, sqlite",
                f"{value:.2f}x, {errors} errors",
                ">= 0.40x, 0 errors",
                value >= 0.40 and errors == 0,
            )
        )
    else:
        name = "/refresh, DPoP-bound + fresh proof / sign-only app"
        out.append(Target("3c", name, "not measured", ">= 0.40x", None))
    speedup = _get(results, "scaling", "speedup")
    if isinstance(speedup, dict) and speedup:
        figure = ", ".join(
            f"{w}: {_get(results, 'scaling', 'refresh_per_s')[w]:.0f}/s ({s:.2f}x)"
            for w, s in speedup.items()
        )
        errors = _get(results, "scaling", "errors")
        out.append(
            Target(
                "3",
                "/refresh on PostgreSQL by processes",
                figure,
                "reported, 0 errors",
                errors == 0,
            )
        )
    rss = _get(results, "memory", "rss_mb")
    growth = _get(results, "memory", "growth")
    if _ok(rss) and _ok(growth):
        n = _get(results, "memory", "refreshes")
        half = _get(results, "memory", "half_refreshes")
        out.append(
            Target("4a", f"RSS after {n} refreshes", f"{rss:.1f} MB", "<= 150 MB", rss <= 150)
        )
        out.append(
            Target(
                "4b",
                f"RSS growth {half} -> {n} refreshes",
                f"{growth * 100:+.1f} %",
                "< +10 %",
                growth < 0.10,
            )
        )
    else:
        out.append(Target("4a", "RSS after refreshes", "not measured", "<= 150 MB", None))
    purge = _get(results, "purge", "ok")
    out.append(
        Target(
            "4c",
            "expired refresh rows purged (task and CLI)",
            "yes" if purge else "not measured" if purge is None else "NO",
            "yes",
            purge,
        )
    )
    overhead = _get(results, "metrics", "overhead")
    if _ok(overhead):
        out.append(
            Target(
                "15",
                "/protected server CPU/request, metrics on / off",
                f"{overhead * 100:+.1f} %",
                "<= +5 %",
                overhead <= 0.05,
            )
        )
    startup = _get(results, "startup", "median_s")
    if _ok(startup):
        worst = _get(results, "startup", "max_s")
        out.append(
            Target(
                "5",
                "`authserver serve` to /health 200",
                f"{startup:.2f} s (worst {worst:.2f} s)",
                "<= 2 s",
                startup <= 2.0,
            )
        )
    else:
        out.append(Target("5", "`authserver serve` to /health 200", "not measured", "<= 2 s", None))
    return out


def table(results: dict[str, Any]) -> str:
    rows = [("", "target", "figure", "required", "")]
    for t in targets(results):
        verdict = "-" if t.passed is None else "PASS" if t.passed else "MISS"
        rows.append((t.id, t.name, t.figure, t.required, verdict))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def details(results: dict[str, Any]) -> str:
    """Absolute figures and CPU per request, under the verdict table."""
    lines = []
    p = results.get("protected")
    if isinstance(p, dict) and "rps" in p:
        lines.append(
            "/protected  req/s: "
            + ", ".join(f"{k} {v:.0f}" for k, v in p["rps"].items())
            + "   server CPU us/req: "
            + ", ".join(f"{k} {v:.0f}" for k, v in p["cpu_us_per_request"].items())
        )
    mt = results.get("metrics")
    if isinstance(mt, dict) and "cpu_ratio" in mt:
        cpu, rps = mt["cpu_us_per_request"], mt["rps"]
        lines.append(
            f"metrics    /protected CPU us/req off {cpu['off']:.1f}, on {cpu['on']:.1f} "
            f"({mt['cpu_ratio']:.3f}x); req/s off {rps['off']:.0f}, on {rps['on']:.0f}"
        )
    lg = results.get("login")
    if isinstance(lg, dict) and "login_per_s" in lg:
        lines.append(
            f"/login      {lg['login_per_s']:.2f}/s vs bound {lg['bound_per_s']:.2f}/s "
            f"({lg['cores']} cores / {lg['checkpw_ms']:.0f} ms checkpw); "
            f"{lg['cpu_ms_per_login']:.0f} ms CPU/login; /protected p99 "
            f"{lg['idle_p99_ms']:.2f} -> {lg['loaded_p99_ms']:.2f} ms"
        )
    for backend, r in (results.get("refresh") or {}).items():
        if isinstance(r, dict) and "refresh_per_s" in r:
            cpu = r["cpu_us_per_request"]
            lines.append(
                f"/refresh    {backend}: {r['refresh_per_s']:.0f}/s "
                f"vs sign {r['sign_per_s']:.0f}/s;"
                f" server CPU us/req: refresh {cpu['refresh']:.0f}, sign {cpu['sign']:.0f}"
            )
    for backend, c in (results.get("clients") or {}).items():
        if isinstance(c, dict) and "rps" in c:
            rps, cpu = c["rps"], c["cpu_us_per_request"]
            lines.append(
                f"/token cc   {backend}: {rps['client_credentials']:.0f}/s vs sign "
                f"{rps['sign']:.0f}/s; /introspect {rps['introspect']:.0f}/s vs bare "
                f"{rps['bare']:.0f}/s; server CPU us/req: "
                + ", ".join(f"{k} {v:.0f}" for k, v in cpu.items())
            )
    d = results.get("dpop-protected")
    if isinstance(d, dict) and "rps" in d:
        lines.append(
            "/protected DPoP  req/s: "
            + ", ".join(f"{k} {v:.0f}" for k, v in d["rps"].items())
            + "   server CPU us/req: "
            + ", ".join(f"{k} {v:.0f}" for k, v in d["cpu_us_per_request"].items())
            + f"   CPU ratio {d['cpu_ratio']:.2f}x, a proof adds {d['dpop_cpu_us']:.0f} us,"
            f" {d['errors']} errors"
        )
    d = results.get("dpop-refresh")
    if isinstance(d, dict) and "refresh_per_s" in d:
        cpu = d["cpu_us_per_request"]
        lines.append(
            f"/refresh DPoP    sqlite: {d['refresh_per_s']:.0f}/s vs sign {d['sign_per_s']:.0f}/s;"
            f" server CPU us/req: refresh {cpu['refresh']:.0f}, sign {cpu['sign']:.0f}"
            f"   CPU ratio {d['cpu_ratio']:.2f}x, {d['errors']} errors"
        )
    m = results.get("memory")
    if isinstance(m, dict) and "rows" in m:
        lines.append(
            f"memory     RSS {m['start_rss_mb']:.1f} -> {m['half_rss_mb']:.1f} -> "
            f"{m['rss_mb']:.1f} MB;"
            f" rows after: {m['rows']}"
        )
    return "\n".join(lines)


README_START = "<!-- bench:results (written by python -m bench; edits here are overwritten) -->"
README_END = "<!-- /bench:results -->"


def markdown(results: dict[str, Any]) -> str:
    """The README's results: how the run was made, on what, and the verdicts."""
    meta = results.get("meta", {})
    idle = meta.get("idle_share_before")
    load = meta.get("loadavg_before") or [math.nan]
    machine = (
        f"{meta.get('cores', '?')} cores ({meta.get('machine', '?')}), Python "
        f"{meta.get('python', '?')}, load generator {meta.get('client', '?')}"
    )
    lines = [
        f"**Results** of `{meta.get('command', 'python -m bench')}` ({meta.get('mode', '?')} "
        f"mode, {meta.get('date', '?')}, {meta.get('seconds', 0):.0f} s) on {machine}; "
        "`bench/results.json` has every round.",
        "",
        "Machine idle before the run: "
        + (f"**{idle:.0%}**" if _ok(idle) else "not measured")
        + f" (load average {load[0]:.2f}). Figures are medians of the per-round ratios; "
        "the spread is the lowest and highest round.",
        "",
        "| # | target | achieved | spread over rounds | server CPU per request | required | |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for t in targets(results):
        verdict = "-" if t.passed is None else "pass" if t.passed else "**MISS**"
        lines.append(
            f"| {t.id} | {t.name} | {t.figure} | {t.spread} | {t.cpu} | {t.required} | {verdict} |"
        )
    detail = details(results)
    if detail:
        lines += ["", "```text", detail, "```"]
    lines += ["", "![benchmark results](bench/results.png)"]
    return "\n".join(lines)


def update_readme(results: dict[str, Any], readme: Path) -> None:
    """Replace what stands between the README's results markers with this run's."""
    text = readme.read_text()
    start, end = text.find(README_START), text.find(README_END)
    if start < 0 or end < start:
        raise ValueError(f"{readme} has no {README_START} ... {README_END} block")
    body = f"{README_START}\n{markdown(results)}\n"
    readme.write_text(text[:start] + body + text[end:])


def write_json(results: dict[str, Any], path: Path) -> None:
    document = {**results, "targets": [asdict(t) for t in targets(results)]}
    path.write_text(json.dumps(document, indent=2, sort_keys=False, default=str) + "\n")


def chart(results: dict[str, Any], path: Path) -> None:
    """The ratios against their targets, CPU per request, scaling, memory, clients."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(3, 3, figsize=(15, 12.5))
    mode = results.get("meta", {}).get("mode", "")
    fig.suptitle(
        f"authserver benchmark ({mode} mode): ratios to baselines measured in the same run, medians"
    )

    def bars(
        ax: Any,
        labels: list[str],
        values: list[float],
        goals: list[float],
        title: str,
        *,
        higher: bool = True,
    ) -> None:
        colors = [
            "tab:green" if (v >= g if higher else v <= g) else "tab:red"
            for v, g in zip(values, goals, strict=True)
        ]
        xs = range(len(values))
        ax.bar(xs, values, color=colors)
        for x, g in zip(xs, goals, strict=True):
            ax.hlines(g, x - 0.4, x + 0.4, colors="black", linestyles="dashed")
        for x, v in zip(xs, values, strict=True):
            ax.annotate(f"{v:.2f}", (x, v), ha="center", va="bottom")
        ax.set_xticks(list(xs), labels)
        ax.set_title(title)

    p = results.get("protected") or {}
    if "reused_ratio" in p:
        bars(
            axes[0][0],
            ["reused token", "fresh token"],
            [p["reused_ratio"], p["fresh_ratio"]],
            [0.80, 0.55],
            "1. /protected throughput / bare FastAPI (dashed: target)",
        )
        axes[0][0].set_ylim(0, max(1.15, p["reused_ratio"] * 1.1, p["fresh_ratio"] * 1.1))
    lg = results.get("login") or {}
    if "login_ratio" in lg:
        bars(
            axes[0][1],
            ["logins / bcrypt bound", "GET p99 loaded / idle"],
            [lg["login_ratio"], lg["p99_ratio"]],
            [0.85, 2.0],
            "2. /login at bcrypt cost 12",
        )
        axes[0][1].patches[1].set_color("tab:green" if lg["p99_ratio"] <= 2.0 else "tab:red")
    refresh = results.get("refresh") or {}
    labels = [b for b in ("sqlite", "postgresql") if "ratio" in (refresh.get(b) or {})]
    if labels:
        bars(
            axes[0][2],
            labels,
            [refresh[b]["ratio"] for b in labels],
            [0.5] * len(labels),
            "3. /refresh / sign-only app (32 clients)",
        )
    cpu_labels, cpu_values = [], []
    for k, v in (p.get("cpu_us_per_request") or {}).items():
        cpu_labels.append(f"protected\n{k}" if k != "bare" else "bare\nFastAPI")
        cpu_values.append(v)
    for b in labels:
        short = "pg" if b == "postgresql" else b
        cpu_labels += [f"sign\n({short})", f"refresh\n({short})"]
        cpu_values += [
            refresh[b]["cpu_us_per_request"]["sign"],
            refresh[b]["cpu_us_per_request"]["refresh"],
        ]
    if cpu_values:
        ax = axes[1][0]
        ax.bar(range(len(cpu_values)), cpu_values, color="tab:blue")
        ax.set_xticks(range(len(cpu_values)), cpu_labels, fontsize=8)
        ax.set_ylabel("server CPU µs per request")
        ax.set_title("CPU time per request of the serving process (/proc)")
    s = results.get("scaling") or {}
    if s.get("refresh_per_s"):
        ax = axes[1][1]
        workers = [int(w) for w in s["refresh_per_s"]]
        rps = list(s["refresh_per_s"].values())
        ax.plot(workers, rps, marker="o", label="measured")
        ax.plot(
            workers,
            [rps[0] * w / workers[0] for w in workers],
            linestyle="dotted",
            color="grey",
            label="linear",
        )
        ax.set_xticks(workers)
        ax.set_xlabel("server processes (--workers)")
        ax.set_ylabel("refreshes / s")
        ax.set_title("3. /refresh on PostgreSQL, scaling")
        ax.legend()
    m = results.get("memory") or {}
    if m.get("samples"):
        ax = axes[1][2]
        ax.plot(
            [x["refreshes"] for x in m["samples"]], [x["rss_mb"] for x in m["samples"]], marker="."
        )
        ax.axhline(150, color="red", linestyle="dashed", label="150 MB limit")
        ax.set_ylim(0, max(160, max(x["rss_mb"] for x in m["samples"]) * 1.1))
        ax.set_xlabel("refreshes")
        ax.set_ylabel("server RSS, MB")
        ax.set_title("4. memory while refreshing (SQLite)")
        ax.legend()
    _clients_panels(results, axes[2][0], axes[2][1], bars)
    axes[2][2].axis("off")
    for ax in (a for row in axes for a in row):
        if ax.axison and not ax.has_data():
            ax.text(0.5, 0.5, "not measured", ha="center", va="center", transform=ax.transAxes)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _clients_panels(results: dict[str, Any], ratios: Any, cpu: Any, bars: Any) -> None:
    """Issue 12's two ratios per database, and the CPU per request behind them."""
    clients = results.get("clients") or {}
    measured = [b for b in ("sqlite", "postgresql") if "rps" in (clients.get(b) or {})]
    if measured:
        short = {"sqlite": "sqlite", "postgresql": "pg"}
        bars(
            ratios,
            [
                f"{kind.replace('client_credentials', 'client creds')}\n({short[b]})"
                for b in measured
                for kind in ("client_credentials", "introspect")
            ],
            [
                clients[b][f"{k}_ratio"]
                for b in measured
                for k in ("client_credentials", "introspect")
            ],
            [goal for _ in measured for goal in (0.85, 0.60)],
            "6. /token client_credentials / sign-only; /introspect / bare",
        )
        ax = cpu
        labels, values = [], []
        for b in measured:
            for k, v in clients[b]["cpu_us_per_request"].items():
                labels.append(f"{k.replace('client_credentials', 'cc')}\n({short[b]})")
                values.append(v)
        ax.bar(range(len(values)), values, color="tab:blue")
        ax.set_xticks(range(len(values)), labels, fontsize=8)
        ax.set_ylabel("server CPU µs per request")
        ax.set_title("6. CPU time per request: clients and their peers")
