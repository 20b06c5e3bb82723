"""The results as markdown tables (printed, and written to table.md) and PNG plots."""

from __future__ import annotations

from pathlib import Path
from typing import Any

MiB = 2**20


def _ratio(r: dict[str, Any]) -> str:
    return f"{r['median']:.3f}"


def _spread(r: dict[str, Any]) -> str:
    return f"{r['min']:.3f}–{r['max']:.3f}"


def _launches(medians: list[float] | None) -> str:
    return " / ".join(f"{m:.3f}" for m in medians) if medians else ""


def _ms(s: dict[str, Any]) -> str:
    return f"{s['median']:.1f}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def markdown(results: dict[str, Any]) -> str:
    b = results["benchmarks"]
    out: list[str] = []
    rows = []

    def row(
        workload: str, vs: str, ratio: dict[str, Any], launches: list[float] | None, ours: Any, theirs: Any
    ) -> None:
        ms = [_ms(s) if s else "" for s in (ours, theirs)]
        rows.append([workload, vs, _ratio(ratio), _launches(launches), _spread(ratio), *ms])

    for workload, e in b.get("overhead", {}).get("workloads", {}).items():
        row(workload, "hand loop", e["ratio"], e.get("launch_medians"), e["ms_ours"], e["ms_hand"])
        if "noise_floor" in e:
            nf = e["noise_floor"]
            row(workload, "ours, identical copy (noise floor)", nf, nf.get("launch_medians"), e["ms_ours"], None)
        if "ddp_defaults_vs_hand" in e:
            row(
                workload,
                "hand loop, ours on PyTorch's DDP defaults",
                e["ddp_defaults_vs_hand"],
                None,
                None,
                e["ms_hand"],
            )
    for workload, peers in b.get("peers", {}).get("workloads", {}).items():
        for peer, e in peers.items():
            row(workload, peer, e["ratio"], e.get("launch_medians"), e["ms_ours"], e[f"ms_{peer}"])
    if rows:
        out.append(
            "Time per optimizer step, ours / theirs (2 processes, gloo; one step each in turn, ratio per round):\n"
        )
        header = ["workload", "vs", "ratio (median)", "per launch", "spread (min–max)", "ours ms", "theirs ms"]
        out += _table(header, rows)
        out.append("")
    if "comm" in b and "per_k" in b["comm"]:
        rows = []
        for k, e in sorted(b["comm"]["per_k"].items(), key=lambda item: int(item[0])):
            o, n = e["ours"], e["naive"]
            rows.append(
                [
                    k,
                    f"{o['gradient_rounds']} / {n['gradient_rounds']}",
                    f"{o['gradient_bytes'] / MiB:.1f} / {n['gradient_bytes'] / MiB:.1f}",
                    f"{o['other_calls']} × {o['other_bytes'] / max(o['other_calls'], 1):.0f} B",
                    _ms(o["ms_per_step"]),
                    _ms(n["ms_per_step"]),
                    _ratio(e["naive_over_ours"]),
                    _spread(e["naive_over_ours"]),
                ]
            )
        out.append(
            f"Communication per optimizer step ({b['comm']['task']}), ours (no_sync) / naive (sync every micro-step):\n"
        )
        header = ["K", "gradient rounds", "gradient MiB", "ours: other all-reduces", "ours ms", "naive ms"]
        out += _table(header + ["naive / ours", "spread"], rows)
        out.append("")
    if "memory" in b and "median_peak_bytes" in b["memory"]:
        m = b["memory"]
        peaks = m["median_peak_bytes"]
        rows = [
            [
                str(k),
                *(f"{peaks[v][str(k)] / MiB:.1f}" for v in ("ours", "loop1", "loop2")),
                f"{peaks['loop2'][str(k)] / peaks['loop1'][str(k)]:.2f}",
            ]
            for k in m["ks"]
        ]
        out.append(
            f"Peak memory above model + data for one optimizer step, example LM, micro {m['micro']} ({m['measure']}), MiB:\n"
        )
        out += _table(
            ["K", "ours", "loop 1 (backward per micro-batch)", "loop 2 (one backward)", "loop 2 / loop 1"], rows
        )
        out.append("")
    if "microbatch" in b and "ms_per_step" in b["microbatch"]:
        mb = b["microbatch"]
        auto, fits = mb["auto"], mb["auto"]["fits"]
        rows = [
            [
                m,
                _ms(s),
                f"{s['min']:.1f}–{s['max']:.1f}",
                "yes" if fits.get(m) else "no",
                ("auto" if int(m) == auto["micro_batch_size"] else "")
                + (" fastest" if int(m) == mb.get("fastest_fitting") else ""),
            ]
            for m, s in sorted(mb["ms_per_step"].items(), key=lambda item: int(item[0]))
        ]
        out.append(
            f"Time per optimizer step at global batch {mb['global_batch']} across micro-batch sizes ({mb['task']}):\n"
        )
        out += _table(["micro", "ms (median)", "spread", "fits the budget", ""], rows)
        if "auto_over_fastest" in mb:
            r = mb["auto_over_fastest"]
            out.append(
                f"\nauto picks micro {auto['micro_batch_size']}: {_ratio(r)}× the fastest that fits (spread {_spread(r)})"
            )
        out.append("")
    if "launch" in b and "cli_seconds" in b["launch"]:
        la = b["launch"]
        rows = [[name, f"{s['median']:.3f}", f"{s['min']:.3f}–{s['max']:.3f}"] for name, s in la["cli_seconds"].items()]
        first = la.get("first_step_seconds", {})
        rows += [
            [f"{name} → first step", f"{s['median']:.2f}", f"{s['min']:.2f}–{s['max']:.2f}"]
            for name, s in first.items()
        ]
        out.append("Launch latency, wall seconds:\n")
        out += _table(["command", "median s", "spread"], rows)
        if "launch_over_torchrun" in la:
            r = la["launch_over_torchrun"]
            out.append(f"\ngradaccum launch / bare torchrun to the first step: {_ratio(r)} (spread {_spread(r)})")
        else:
            out.append(f"\nfirst training step: {la['first_step_skipped']}")
        out.append("")
    if "gpu" in b and "ours_over_hand" in b["gpu"]:
        g = b["gpu"]
        out.append(
            f"GPU ({g['device']}): ours / hand loop tokens/s {_ratio(g['ours_over_hand'])} (spread {_spread(g['ours_over_hand'])})\n"
        )
    out.append("Targets:\n")
    out += _table(
        ["target", "value", "limit", "result"],
        [
            [
                t["name"],
                "n/a" if t["value"] is None else f"{t['value']:.4g}",
                f"{t['op']} {t['limit']:g}",
                "pass" if t["passed"] else "MISSED",
            ]
            for t in results["targets"]
        ],
    )
    for name, e in b.items():
        if isinstance(e, dict) and e.get("error"):
            out.append(f"\n{name}: ERROR {e['error'].splitlines()[0]}")
        if isinstance(e, dict) and e.get("skipped"):
            for what, why in e["skipped"].items():
                out.append(f"\n{name}: {what} skipped: {why}")
    return "\n".join(out) + "\n"


# --------------------------------------------------------------------------- plots
def plots(results: dict[str, Any], out_dir: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    b, written = results["benchmarks"], []

    def save(fig: Any, name: str) -> None:
        fig.tight_layout()
        fig.savefig(out_dir / name, dpi=110)
        plt.close(fig)
        written.append(name)

    training = {}
    for workload, e in b.get("overhead", {}).get("workloads", {}).items():
        training.setdefault(workload, {})["ours"] = e["ms_ours"]
        training[workload]["hand"] = e["ms_hand"]
    for workload, peers in b.get("peers", {}).get("workloads", {}).items():
        for peer, e in peers.items():
            training.setdefault(workload, {}).setdefault("ours", e["ms_ours"])
            training[workload][peer] = e[f"ms_{peer}"]
    if training:
        fig, axes = plt.subplots(1, len(training), figsize=(4.2 * len(training), 3.6), squeeze=False)
        for ax, (workload, by) in zip(axes[0], training.items(), strict=True):
            names = list(by)
            med = [by[n]["median"] for n in names]
            err = [[by[n]["median"] - by[n]["q1"] for n in names], [by[n]["q3"] - by[n]["median"] for n in names]]
            ax.bar(names, med, yerr=err, capsize=4, color=["C0" if n == "ours" else "C7" for n in names])
            ax.set_title(workload)
            ax.set_ylabel("ms per optimizer step (median, quartiles)")
        save(fig, "training.png")
    if "comm" in b and "per_k" in b["comm"]:
        ks = sorted(b["comm"]["per_k"], key=int)
        per = b["comm"]["per_k"]
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.6))
        for name, style in (("ours", "o-"), ("naive", "s--")):
            a1.plot([int(k) for k in ks], [per[k][name]["gradient_bytes"] / MiB for k in ks], style, label=name)
            a2.plot([int(k) for k in ks], [per[k][name]["ms_per_step"]["median"] for k in ks], style, label=name)
        a1.set(
            xlabel="accumulation steps K",
            ylabel="gradient all-reduce MiB per step",
            xscale="log",
            xticks=[int(k) for k in ks],
        )
        a2.set(
            xlabel="accumulation steps K",
            ylabel="ms per optimizer step (median)",
            xscale="log",
            xticks=[int(k) for k in ks],
        )
        for ax in (a1, a2):
            ax.set_xticklabels(ks)
            ax.minorticks_off()
            ax.legend()
        save(fig, "comm.png")
    if "memory" in b and "median_peak_bytes" in b["memory"]:
        m = b["memory"]
        fig, ax = plt.subplots(figsize=(5.5, 3.8))
        for name, style, label in (
            ("loop1", "o-", "loop 1: backward per micro-batch"),
            ("loop2", "s--", "loop 2: one backward"),
            ("ours", "^:", "ours (DDPTrainer)"),
        ):
            ax.plot(m["ks"], [m["median_peak_bytes"][name][str(k)] / MiB for k in m["ks"]], style, label=label)
        ax.set(xlabel="accumulation steps K", ylabel="peak MiB above model + data", xscale="log", xticks=m["ks"])
        ax.set_xticklabels([str(k) for k in m["ks"]])
        ax.minorticks_off()
        ax.set_title(f"example LM, micro-batch {m['micro']}")
        ax.legend()
        save(fig, "memory.png")
    if "microbatch" in b and "ms_per_step" in b["microbatch"]:
        mb = b["microbatch"]
        sizes = sorted(int(m) for m in mb["ms_per_step"])
        s = [mb["ms_per_step"][str(m)] for m in sizes]
        fig, ax = plt.subplots(figsize=(5.5, 3.8))
        ax.errorbar(
            sizes,
            [x["median"] for x in s],
            yerr=[[x["median"] - x["min"] for x in s], [x["max"] - x["median"] for x in s]],
            fmt="o-",
            capsize=4,
        )
        auto = mb["auto"]["micro_batch_size"]
        ax.axvline(auto, color="C3", linestyle="--", label=f"auto: micro {auto}")
        ax.set(xlabel="micro-batch size", ylabel="ms per optimizer step", xscale="log", xticks=sizes)
        ax.set_xticklabels([str(m) for m in sizes])
        ax.minorticks_off()
        ax.set_title(f"global batch {mb['global_batch']}, 2 processes")
        ax.legend()
        save(fig, "microbatch.png")
    return written
