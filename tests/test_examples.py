"""examples/digits_mlp.py (what `make demo` runs) keeps working: short run, curves agree."""
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_digits_example_agrees_with_optax_and_writes_the_plot(tmp_path):
  png = tmp_path / "loss.png"
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  out = subprocess.run(
      [sys.executable, str(ROOT / "examples" / "digits_mlp.py"), "--epochs", "3", "--steps", "3",
       "--warmup", "1", "--plot", str(png)],
      capture_output=True, text=True, env=env, timeout=300, check=False)
  assert out.returncode == 0, out.stdout + out.stderr
  assert "loss curves agree" in out.stdout
  assert "final test accuracy" in out.stdout and "bench: fusedopt" in out.stdout
  assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  # the run actually learned: epoch 3's loss well below epoch 1's
  rows = [l.split() for l in out.stdout.splitlines() if l.strip()[:1].isdigit() and
          len(l.split()) == 4]
  assert float(rows[-1][1]) < 0.6 * float(rows[0][1])


def test_digits_example_with_another_optimizer():
  """``--optimizer``: the same agreement check with another fusedopt/optax pair (ADOPT: its
  first step moves nothing, its clip grows with the step)."""
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  out = subprocess.run(
      [sys.executable, str(ROOT / "examples" / "digits_mlp.py"), "--optimizer", "adopt",
       "--epochs", "2", "--steps", "0", "--plot", ""],
      capture_output=True, text=True, env=env, timeout=300, check=False)
  assert out.returncode == 0, out.stdout + out.stderr
  assert "fusedopt.ADOPT / optax.contrib.adopt" in out.stdout and "loss curves agree" in out.stdout
