"""How vlpre's checkpoints are written (their resume behaviour: test_train, test_faults,
test_elastic, test_checkpoint_compat)."""
import jax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np

from vlpre import checkpoint

BACKEND_COMPILE = "/jax/core/compile/backend_compile_duration"


def test_one_process_writes_replicated_arrays_without_compiling_a_program(tmp_path):
  """Arrays replicated over the data axis (fsdp-sharded, or wholly replicated) are written
  from one replica: within one process orbax's replica-parallel writing would compile a
  slice program per array shape and device at every save. The restore is exact."""
  mesh = jax.make_mesh((2, 4), ("data", "fsdp"))
  state = {
      "w": jax.device_put(np.arange(64 * 8, dtype=np.float32).reshape(64, 8),
                          NamedSharding(mesh, P("fsdp"))),
      "b": jax.device_put(np.linspace(0, 1, 24, dtype=np.float32), NamedSharding(mesh, P())),
  }
  compiles = []

  def listener(event, seconds, **kwargs):
    del seconds, kwargs
    if event == BACKEND_COMPILE:
      compiles.append(event)

  ckpt = checkpoint.Checkpointer(str(tmp_path / "checkpoints"), async_save=False)
  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    assert ckpt.save(1, state, None, force=True)
    ckpt.wait()
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
  assert compiles == [], f"{len(compiles)} programs compiled to write a checkpoint"
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                          state)
  restored = ckpt.restore(1, abstract)
  for k in state:
    np.testing.assert_array_equal(np.asarray(restored[k]), np.asarray(state[k]))
    assert restored[k].sharding == state[k].sharding
  ckpt.close()
