"""Helpers for verifying the Triton backend's kernels without a GPU (tests/test_triton_kernels.py).

- ``compile_spec``: ``triton.compile`` of a generated kernel for ``GPUTarget('cuda', arch, 32)``
  with the signature, 16-byte pointer alignment and options jax-triton uses;
- ``triton_calls``: the jax-triton custom calls of a lowered module, each with its operand/output
  aliases and the Triton IR jax-triton compiled into it (zlib-compressed in ``backend_config``).
"""
import re
import zlib

from fusedopt.kernels import triton as kt

_TY = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


def signature(spec, n_rows_type="i32"):
  rule = spec.rule
  _, ins, outs = kt.generate(spec)
  ty = {"S": "*fp32", "P": f"*{_TY[spec.p_dtype]}", "P_OUT": f"*{_TY[spec.p_dtype]}"}
  if spec.g_dtype:
    ty["G"] = f"*{_TY[spec.g_dtype]}"
  for i in range(len(rule.seg_scalars)):
    ty[f"Q{i}"] = "*fp32"
  for k, d in enumerate(spec.st_dtypes):
    ty[f"ST{k}"] = ty[f"ST{k}_OUT"] = f"*{_TY[d]}"
  for t in range(4):
    ty[f"SUM{t}"] = "*fp32"
  sig = {name: ty[name] for name in ins}
  sig["N_ROWS"] = n_rows_type
  sig.update({name: ty[name] for name in outs})
  return sig


def _compile(fn, sig, constexprs, arch, tuning):
  import triton  # pylint: disable=import-outside-toplevel
  from triton.backends.compiler import GPUTarget  # pylint: disable=import-outside-toplevel
  from triton.compiler import ASTSource  # pylint: disable=import-outside-toplevel
  names = list(sig)
  for k in constexprs:
    sig[k] = "constexpr"
  # jax-triton marks every array argument 16-byte aligned (tt.divisibility = 16)
  attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names) if sig[n].startswith("*")}
  src = ASTSource(fn=fn, signature=sig, constexprs=constexprs, attrs=attrs)
  # the PTX ISA the kernels are handed on in (``kt.ptx_version``), not Triton's newest
  return triton.compile(src, target=GPUTarget("cuda", arch, 32),
                        options={"num_warps": tuning.num_warps, "num_stages": tuning.num_stages,
                                 "enable_fp_fusion": False, "ptx_version": kt.ptx_version(arch)})


def compile_spec(spec, arch, tuning=None, rows=64, n_rows_type="i32"):
  tuning = tuning or kt.default_tuning(spec.rule, spec.p_dtype, "gpu")
  kernel, _, _ = kt.update_kernel(spec)
  r, c = kt._tile(rows, tuning)  # pylint: disable=protected-access
  return _compile(kernel, signature(spec, n_rows_type),
                  {"R": r, "C": c, "ROWS_PER_UNIT": kt.ALIGN // c}, arch, tuning)


def signature_leaves(spec):
  """The argument types jax-triton gives a leaf-direct kernel (``spec.leaves`` > 0)."""
  _, ins, outs = kt.generate(spec)
  p, st = f"*{_TY[spec.p_dtype]}", [f"*{_TY[d]}" for d in spec.st_dtypes]
  ty = {"S": "*fp32", **{name: "*i32" for name in kt.TABLES}}   # jax arrays of int32
  for name in ins + outs:
    if re.fullmatch(r"P\d+(_OUT)?", name):
      ty[name] = p
    elif re.fullmatch(r"G\d+", name):
      ty[name] = f"*{_TY[spec.g_dtype]}"
    elif m := re.fullmatch(r"ST(\d+)(_\d+)?(_OUT)?", name):   # flat, or per leaf (ST<f>_<j>)
      ty[name] = st[int(m.group(1))]
    elif re.fullmatch(r"(Q|SUM)\d+", name):
      ty[name] = "*fp32"
  return {name: ty[name] for name in ins + outs}


def compile_spec_leaves(spec, arch, tuning=None, rows=64):
  """``triton.compile`` of a leaf-direct update kernel (``spec.leaves`` leaf pointers)."""
  tuning = tuning or kt.default_tuning(spec.rule, spec.p_dtype, "gpu")
  kernel, _, _ = kt.update_kernel(spec)
  r, c = kt._tile(rows, tuning)  # pylint: disable=protected-access
  return _compile(kernel, signature_leaves(spec), {"R": r, "C": c, "VEC": spec.vec}, arch,
                  tuning)


def signature_quantized(spec):
  """The argument types jax-triton gives a quantized-state kernel (``kt.QuantizedKernelSpec``):
  codes uint8, scales and decode tables float32, bucket tables int32."""
  _, ins, outs = kt.generate_quantized(spec)
  ty = {"S": "*fp32", **{name: "*i32" for name in kt.TABLES}}
  for name in ins + outs:
    if re.fullmatch(r"P\d+(_OUT)?", name):
      ty[name] = f"*{_TY[spec.p_dtype]}"
    elif re.fullmatch(r"G\d+", name):
      ty[name] = f"*{_TY[spec.g_dtype]}"
    elif re.fullmatch(r"CODES\d+(_OUT)?", name):
      ty[name] = "*u8"
    elif re.fullmatch(r"BKT\d+", name):
      ty[name] = "*i32"
    elif m := re.fullmatch(r"ST(\d+)(_OUT)?", name):
      ty[name] = f"*{_TY[spec.kinds[int(m.group(1))]]}"
    elif re.fullmatch(r"(Q|SUM|SCALES|MAP)\d+(_OUT)?", name):
      ty[name] = "*fp32"
  return {name: ty[name] for name in ins + outs}


def compile_quantized(spec, arch, tuning=None):
  """``triton.compile`` of a quantized-state kernel: rows of 256 elements, ``block // 256`` a
  program."""
  tuning = tuning or kt.default_tuning(spec.rule, spec.p_dtype, "gpu")
  kernel, _, _ = kt.quantized_kernel(spec)
  return _compile(kernel, signature_quantized(spec),
                  {"R": tuning.block // 256, "C": 256, "VEC": spec.vec}, arch, tuning)


def compile_prepass_leaves(k, dtype, vec, arch, tuning=None):
  tuning = tuning or kt.DEFAULT_TUNING[("gpu", 4 if dtype == "float32" else 2)]
  r, c = kt._tile(64, tuning)  # pylint: disable=protected-access
  sig = {"S": "*fp32", **{name: "*i32" for name in kt.TABLES[:4]}}
  sig.update({f"G{j}": f"*{_TY[dtype]}" for j in range(k)})
  sig.update({"SUMSQ": "*fp32", "BAD": "*fp32"})
  return _compile(kt.prepass_kernel_leaves(k), sig, {"R": r, "C": c, "VEC": vec}, arch, tuning)


def ptx_versions(lowered):
  """The PTX ``.version`` of every jax-triton custom call's kernel in ``lowered`` ("8.0", ...)."""
  return [re.search(r"\.version (\d+\.\d+)", text).group(1) for _, text in _calls(lowered)]


def kernel_ptx(lowered):
  """The PTX of every jax-triton custom call's kernel in ``lowered``: from its ``.version`` line
  to the last closing brace before the serialized call's next binary field."""
  out = []
  for _, text in _calls(lowered):
    ptx = text[text.index(".version"):]
    end = next((i for i, c in enumerate(ptx) if not (c.isprintable() or c in "\n\t")), len(ptx))
    out.append(ptx[:ptx.rindex("}", 0, end) + 1] + "\n")
  return out


def triton_calls(lowered):
  """[(n_aliases, ttir_text)] for every jax-triton custom call of ``lowered``."""
  out = []
  for aliases, text in _calls(lowered):
    m = re.search(r"module \{.*\}", text, re.S)
    out.append((aliases, m.group(0) if m else text))
  return out


def _calls(lowered):
  """[(n_aliases, the kernel as text: its PTX and Triton IR)] of every jax-triton custom call of
  ``lowered``."""
  from jax._src.lib.mlir import ir  # pylint: disable=import-outside-toplevel
  out = []

  def walk(op):
    for region in op.regions:
      for block in region.blocks:
        for o in block.operations:
          # jax-triton 0.3: "triton_kernel_call", its compressed kernel the backend_config;
          # 0.4: the FFI "triton_kernel_call_ffi", the kernel the mhlo.backend_config's opaque
          if o.operation.name == "stablehlo.custom_call" and ir.StringAttr(
              o.attributes["call_target_name"]).value in ("triton_kernel_call",
                                                          "triton_kernel_call_ffi"):
            aliases = len(ir.ArrayAttr(o.attributes["output_operand_aliases"])) if (
                "output_operand_aliases" in o.attributes) else 0
            config = ir.StringAttr(o.attributes["backend_config"]).value_bytes if (
                "backend_config" in o.attributes) else b""
            if not config:
              config = ir.StringAttr(
                  ir.DictAttr(o.attributes["mhlo.backend_config"])["opaque"]).value_bytes
            text = zlib.decompress(config).decode("latin-1")
            out.append((aliases, text))
          walk(o.operation)
  walk(lowered.compiler_ir("stablehlo").operation)
  return out
