"""FID against solver steps from sweep tables: one Markdown table and one plot.

    python bench/fid_vs_steps.py --out docs/fid_vs_steps.png \
        "DPM-Solver++(2M), old logsnr=outputs/sweeps/steps_old_dpm" \
        "DPM-Solver++(2M), logsnr=outputs/sweeps/steps_new_dpm" "DDIM, trailing=outputs/sweeps/steps_ddim"

Each argument is ``label=sweep directory`` (a jobs/sweep.py ``out``); the sweeps should
share the checkpoint, w, samples and seeds. Error bars: the sweep's bootstrap std of FID.
"""

import argparse

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("curves", nargs="+", help="label=sweep directory")
    ap.add_argument("--out", default="fid_vs_steps.png")
    args = ap.parse_args()
    fig, ax = plt.subplots(figsize=(6, 4))
    rows = {}
    floor = None
    for item in args.curves:
        label, path = item.rsplit("=", 1)
        t = pd.read_csv(f"{path}/table.csv")
        floor = t.loc[t.kind == "real_floor", "fid"].iloc[0]
        g = t[t.kind == "generated"].sort_values("steps")
        ax.errorbar(g.steps, g.fid, yerr=g.fid_std, marker="o", capsize=3, label=label)
        rows[label] = {int(s): f"{f:.1f} ± {e:.1f}" for s, f, e in zip(g.steps, g.fid, g.fid_std)}
    ax.axhline(floor, color="grey", ls=":", label=f"real vs real ({floor:.1f})")
    ax.set_xlabel("solver steps")
    ax.set_ylabel("FID (n = 500, evaluator features)")
    ax.set_ylim(bottom=0)
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    steps = sorted({s for r in rows.values() for s in r})
    print("| solver, spacing | " + " | ".join(f"{s} steps" for s in steps) + " |")
    print("|---|" + "---|" * len(steps))
    for label, r in rows.items():
        print(f"| {label} | " + " | ".join(r.get(s, "") for s in steps) + " |")
    print(f"plot: {args.out}")


if __name__ == "__main__":
    main()
