"""vlpre.step_analysis: the collectives of compiled HLO, the matmul FLOPs of a jaxpr."""
import jax
from jax.sharding import NamedSharding, PartitionSpec as P
import jax.numpy as jnp

from vlpre import sharding
from vlpre import step_analysis


def _mesh():
  return sharding.make_mesh((("data", 2), ("fsdp", 4)), jax.devices())


def test_collectives_of_a_sharded_matmul_gradient_counted_per_loop_iteration():
  """An fsdp gradient: weights gathered for the matmul, the gradient reduced; inside a
  scan of 3 steps every collective runs 3 times, and its bytes with it."""
  mesh = _mesh()
  w_sh = NamedSharding(mesh, P("fsdp", None))
  x_sh = NamedSharding(mesh, P(("data", "fsdp"), None))

  def grad_of(steps):
    def loss(w, x):
      def body(h, _):
        return jnp.tanh(h @ w), None
      return jnp.sum(jax.lax.scan(body, x, None, length=steps)[0] ** 2)
    return jax.jit(jax.grad(loss), in_shardings=(w_sh, x_sh), out_shardings=w_sh)

  args = (jax.ShapeDtypeStruct((64, 64), jnp.float32), jax.ShapeDtypeStruct((32, 64), jnp.float32))
  once = step_analysis.hlo_collectives(grad_of(1).lower(*args).compile().as_text())
  thrice = step_analysis.hlo_collectives(grad_of(3).lower(*args).compile().as_text())
  assert set(once) == set(step_analysis.COLLECTIVES)
  moved = {op: c for op, c in once.items() if c["count"]}
  assert moved, once
  assert all(c["bytes"] > 0 for c in moved.values())
  # The loop's collectives run 3× (ops outside the loop, if any, once): strictly more.
  assert sum(c["count"] for c in thrice.values()) > sum(c["count"] for c in once.values())


def test_collective_parser_on_written_hlo():
  hlo = """HloModule m

%body (p: (s32[], f32[8,4])) -> (s32[], f32[8,4]) {
  %p = (s32[], f32[8,4]) parameter(0)
  %x = f32[8,4]{1,0} get-tuple-element(%p), index=1
  %ag = f32[16,4]{1,0} all-gather(%x), dimensions={0}
  %ar = f32[8,4]{1,0} all-reduce(%x), to_apply=%add
  ROOT %t = (s32[], f32[8,4]) tuple(%i, %ar)
}

%cond (p: (s32[], f32[8,4])) -> pred[] {
  %c = s32[] constant(5)
  ROOT %lt = pred[] compare(%i, %c), direction=LT
}

ENTRY %main (a: bf16[2,3]) -> bf16[4,3] {
  %a = bf16[2,3]{1,0} parameter(0)
  %w = (s32[], f32[8,4]) while(%init), condition=%cond, body=%body
  %s = (bf16[2,3]{1,0}, bf16[4,3]{1,0}) all-gather-start(%a), dimensions={0}
  %d = bf16[4,3]{1,0} all-gather-done(%s)
  ROOT %cp = bf16[4,3]{1,0} collective-permute(%d), source_target_pairs={{0,1}}
}
"""
  found = step_analysis.hlo_collectives(hlo)
  assert found["all-reduce"] == {"count": 5, "bytes": 5 * 8 * 4 * 4}
  # 5 in the loop (f32[16,4]) + the async one at the top (its result's larger array, bf16[4,3])
  assert found["all-gather"] == {"count": 6, "bytes": 5 * 16 * 4 * 4 + 4 * 3 * 2}
  assert found["collective-permute"] == {"count": 1, "bytes": 4 * 3 * 2}
  assert found["reduce-scatter"]["count"] == found["all-to-all"]["count"] == 0


def test_jaxpr_flops_counts_matmuls_convolutions_and_scans():
  def f(w, x, k, img):
    def body(h, _):
      return h @ w, None
    h = jax.lax.scan(body, x, None, length=4)[0]  # 4 × 2·8·16·16
    y = jax.lax.conv_general_dilated(img, k, (1, 1), "VALID",
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return h.sum() + y.sum()

  args = (jnp.ones((16, 16)), jnp.ones((8, 16)), jnp.ones((3, 3, 2, 5)), jnp.ones((1, 6, 6, 2)))
  flops = step_analysis.jaxpr_flops(jax.make_jaxpr(f)(*args))
  conv = 2 * (1 * 4 * 4 * 5) * (3 * 3 * 2)  # output elements × (window × input channels)
  assert flops == 4 * 2 * 8 * 16 * 16 + conv
  # Under grad, a remat'd body recomputes its forward: more executed FLOPs than without.
  plain = jax.make_jaxpr(jax.grad(lambda w, x: jnp.sum(jnp.tanh(x @ w) @ w)))(args[0], args[1])
  remat = jax.make_jaxpr(jax.grad(lambda w, x: jnp.sum(jax.checkpoint(
      lambda w, x: jnp.tanh(x @ w) @ w)(w, x))))(args[0], args[1])
  assert step_analysis.jaxpr_flops(remat.jaxpr) > step_analysis.jaxpr_flops(plain.jaxpr)
