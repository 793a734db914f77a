"""Corrupt checkpoints (issue 14, item 9): bytes that are not a valid fusedopt/flax msgpack
checkpoint raise one clear ``CheckpointError`` (a ValueError) saying so and what was expected,
never a raw decoder error, and the target is left as it was. A valid msgpack of the wrong
structure keeps its ValueError naming the first mismatching path."""
import msgpack
import numpy as np
import jax.numpy as jnp
import pytest

import fusedopt as optim
from fusedopt import serialization as ser
from fusedopt.serialization import CheckpointError

_NOT_VALID = r"not a valid fusedopt/flax checkpoint"


def _opt():
  rng = np.random.RandomState(0)
  params = {"w": jnp.asarray(rng.randn(2, 3), jnp.float32),
            "b": jnp.asarray(rng.randn(3), jnp.float32)}
  return optim.Adam(0.1).create(params)


def _snapshot(opt):
  return [np.array(x) for x in (opt.target["w"], opt.target["b"], opt.state.step)]


def _restore_fails(blob, match=_NOT_VALID, error=CheckpointError):
  """``from_bytes`` raises ``error`` matching ``match``; the target is untouched and still
  restores from a good checkpoint."""
  opt = _opt()
  good = ser.to_bytes(opt)
  before = _snapshot(opt)
  with pytest.raises(error, match=match) as e:
    ser.from_bytes(opt, blob)
  for a, b in zip(before, _snapshot(opt)):
    np.testing.assert_array_equal(a, b)
  back = ser.from_bytes(opt, good)
  np.testing.assert_array_equal(back.target["w"], opt.target["w"])
  return e.value


def _repack_first_array(blob, edit):
  """``blob`` with the payload ``(shape, dtype name, bytes)`` of its first array entry replaced
  by ``edit(shape, name, buf)``, as msgpack (a well-formed container around a bad array)."""
  done = []

  def hook(code, data):
    if code == 1 and not done:
      done.append(True)
      data = msgpack.packb(edit(*msgpack.unpackb(data, raw=True)), use_bin_type=True)
    return msgpack.ExtType(code, data)
  return msgpack.packb(msgpack.unpackb(blob, ext_hook=hook, raw=False), use_bin_type=True)


@pytest.mark.parametrize("keep", [1, 2, 10, 0.5, -1])
def test_truncated_bytes(keep):
  blob = ser.to_bytes(_opt())
  n = int(len(blob) * keep) if isinstance(keep, float) else keep % len(blob)
  err = _restore_fails(blob[:n], _NOT_VALID + r".*truncated or corrupted")
  assert "msgpack" in str(err) and "extension 1" in str(err)   # says what was expected
  assert err.__cause__ is not None                              # the decoder's error kept


def test_trailing_garbage():
  err = _restore_fails(ser.to_bytes(_opt()) + b"\x00garbage", _NOT_VALID + r".*ExtraData")
  assert isinstance(err, ValueError) and ser.CheckpointError is CheckpointError


def test_corrupted_dtype_name():
  blob = ser.to_bytes(_opt())
  assert b"float32" in blob
  _restore_fails(blob.replace(b"float32", b"floqt32", 1),
                 _NOT_VALID + r".*unknown dtype name b'floqt32'")
  _restore_fails(blob.replace(b"float32", b"\xff\xfeoat32", 1), _NOT_VALID + r".*unknown dtype")


@pytest.mark.parametrize("seed", range(8))
def test_random_bytes(seed):
  blob = np.random.RandomState(seed).randint(0, 256, 300).astype(np.uint8).tobytes()
  _restore_fails(blob)


def test_array_whose_byte_length_does_not_match_its_shape():
  blob = ser.to_bytes(_opt())
  short = _repack_first_array(blob, lambda shape, name, buf: (shape, name, buf[:-4]))
  _restore_fails(short, _NOT_VALID + r".*needs \d+ bytes, it holds \d+")
  odd = _repack_first_array(blob, lambda shape, name, buf: (shape, name, buf + b"\x00"))
  _restore_fails(odd, _NOT_VALID + r".*needs \d+ bytes, it holds \d+")
  bad_shape = _repack_first_array(blob, lambda shape, name, buf: ([-1], name, buf))
  _restore_fails(bad_shape, _NOT_VALID + r".*not \(shape, dtype name, bytes\)")
  obj = _repack_first_array(blob, lambda shape, name, buf: ([1], b"object", b"\x00" * 8))
  _restore_fails(obj, _NOT_VALID + r".*object and structured dtypes")
  with pytest.raises(CheckpointError, match=_NOT_VALID):
    ser.msgpack_restore(short)


def test_valid_msgpack_of_the_wrong_structure_names_the_path():
  """(Behaviour kept from before: a ValueError naming the path, not a CheckpointError.)"""
  opt = _opt()
  sd = ser.msgpack_restore(ser.to_bytes(opt))
  sd["target"]["w"] = np.zeros((3, 2), np.float32)
  err = _restore_fails(ser.msgpack_serialize(sd), r"/target/w has shape \(3, 2\)",
                       error=ValueError)
  assert not isinstance(err, CheckpointError)   # it decoded: the structure is what is wrong
  _restore_fails(msgpack.packb({"target": 1}), r"missing \['state'\]", error=ValueError)
  _restore_fails(msgpack.packb(7), "an optimizer checkpoint is a dict", error=ValueError)


def test_not_bytes():
  with pytest.raises(TypeError, match="a checkpoint is bytes, got str"):
    ser.from_bytes(_opt(), "not bytes")
