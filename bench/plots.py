"""PNG plots of a run (matplotlib, Agg: no display needed).

  <stem>-time.png      step time vs parameter count per implementation, one panel per optimizer,
                       over the scale sweep when the run has one (else over all its trees), with
                       the time the bytes model needs at the same-run copy bandwidth (dashed)
  <stem>-roofline.png  % of the same-run copy bandwidth per optimizer and implementation, on each
                       optimizer's largest tree of the run
"""
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  pylint: disable=wrong-import-position
from matplotlib import ticker  # noqa: E402  pylint: disable=wrong-import-position

from . import impls as impls_mod  # noqa: E402  pylint: disable=wrong-import-position

_COLORS = dict(zip(impls_mod.ALL_IMPLS, plt.get_cmap("tab10").colors))


def _optims(results):
  return list(dict.fromkeys(g["optim"] for g in results))


def _impls(groups):
  return list(dict.fromkeys(r["impl"] for g in groups for r in g["impls"] if "step" in r))


def _count(x, _pos=None):
  """1e6 -> '1M', 3e7 -> '30M', 1e9 -> '1B' (tick labels)."""
  for div, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
    if x >= div:
      return f"{x / div:.3g}{unit}"
  return f"{x:g}"


def _title(env):
  return f"{env['device']['jax_device']}, {env['date']}"


def sweep_groups(results, optim):
  """The optimizer's groups to draw against size: the scale sweep's if it has two or more, else
  every tree's; sorted by parameter count."""
  groups = [g for g in results if g["optim"] == optim]
  sweep = [g for g in groups if g["tree"].startswith("scale-")]
  return sorted(sweep if len(sweep) >= 2 else groups, key=lambda g: g["params"])


def time_vs_params(results, env, path):
  optims = _optims(results)
  fig, axes = plt.subplots(1, len(optims), figsize=(5.2 * len(optims), 4.4), squeeze=False)
  for ax, optim in zip(axes[0], optims):
    groups = sweep_groups(results, optim)
    for impl in _impls(groups):
      pts = [(g["params"], r["step"]) for g in groups for r in g["impls"]
             if r["impl"] == impl and "step" in r]
      if not pts:
        continue
      x = [p for p, _ in pts]
      y = [s["median_s"] * 1e3 for _, s in pts]
      err = [[m - s["min_s"] * 1e3 for m, (_, s) in zip(y, pts)],
             [s["max_s"] * 1e3 - m for m, (_, s) in zip(y, pts)]]
      ax.errorbar(x, y, yerr=err, marker="o", ms=4, capsize=2, label=impl,
                  color=_COLORS.get(impl))
    roof = [(g["params"], g["bytes_per_step"] / (g["copy"]["gb_s"] * 1e9) * 1e3)
            for g in groups if g.get("copy")]
    if roof:
      ax.plot(*zip(*roof), "k--", lw=1, label="bytes model at copy BW")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xticks([g["params"] for g in groups])  # one tick per tree, labelled with its size
    ax.xaxis.set_major_formatter(ticker.FuncFormatter(_count))
    ax.xaxis.set_minor_formatter(ticker.NullFormatter())
    ax.set_xlabel("parameters")
    ax.set_ylabel("step time, ms (median, min-max)")
    names = [g["tree"] for g in groups]
    ax.set_title(f"{optim}: " + (", ".join(names) if len(names) <= 3 else
                                 f"{names[0]} ... {names[-1]} ({len(names)} trees)"), fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
  fig.suptitle(f"One optimizer step vs size ({_title(env)})", fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def roofline(results, env, path):
  optims = _optims(results)
  largest = {o: max((g for g in results if g["optim"] == o), key=lambda g: g["params"])
             for o in optims}
  impls = _impls(largest.values())
  fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(optims) * max(1, len(impls)) ** 0.5 + 3),
                                  4.4))
  width = 0.8 / max(1, len(impls))
  for j, impl in enumerate(impls):
    xs, ys = [], []
    for i, o in enumerate(optims):
      rec = next((r for r in largest[o]["impls"] if r["impl"] == impl and "step" in r), None)
      if rec:
        xs.append(i - 0.4 + width * (j + 0.5))
        ys.append(rec["pct_copy_bw"])
    ax.bar(xs, ys, width, label=impl, color=_COLORS.get(impl))
  ax.axhline(100, color="k", ls="--", lw=1)
  ax.set_xticks(range(len(optims)))
  ax.set_xticklabels([f"{o}\n{largest[o]['tree']}, {largest[o]['bytes_per_param']:.0f} B/param"
                      for o in optims], fontsize=8)
  ax.set_ylabel("% of same-run copy bandwidth")
  ax.set_title(f"Effective bandwidth of one step, largest tree per optimizer ({_title(env)})",
               fontsize=10)
  ax.legend(fontsize=7, ncol=2)
  ax.grid(True, axis="y", alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def write_all(results, env, out_dir, stem):
  """Both plots; returns {kind: file name relative to out_dir} of those written."""
  if not any("step" in r for g in results for r in g["impls"]):
    return {}
  os.makedirs(out_dir, exist_ok=True)
  out = {}
  for kind, fn in (("time", time_vs_params), ("roofline", roofline)):
    name = f"{stem}-{kind}.png"
    fn(results, env, os.path.join(out_dir, name))
    out[kind] = name
  return out
