"""train_gpt.py's model and training step, data-parallel under jax.pmap: every device takes a
slice of the batch, gradients and loss are averaged with lax.pmean.

    python examples/train_gpt_pmap.py --tiny
    XLA_FLAGS=--xla_force_host_platform_device_count=8 python examples/train_gpt_pmap.py --tiny

(the second runs on 8 CPU "devices"). Takes train_gpt.py's flags; --batch-size is the global
batch and must divide by the device count.
"""

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from train_gpt import Progress, batches, make_train_step, parse_args, sample, setup


def replicate(tree, devices):
    """One copy of every leaf per device, stacked on a leading axis as pmap takes it."""
    sharding = NamedSharding(Mesh(np.array(devices), ("data",)), PartitionSpec("data"))
    return jax.tree.map(
        lambda x: jax.device_put(np.broadcast_to(x, (len(devices), *np.shape(x))), sharding),
        tree)


def main(argv=None):
    args = parse_args(argv)
    config, dtype, tokenizer, tokens, model, optimizer = setup(args)
    devices = jax.local_devices()
    if config.batch_size % len(devices):
        raise SystemExit(f"--batch-size {config.batch_size} must divide by the "
                         f"{len(devices)} devices")
    print(f"{len(devices)} x {devices[0].platform}: {config.num_layers} layers, "
          f"{config.num_heads} heads, dim {config.model_dim}, seq_len {config.seq_len}, global "
          f"batch {config.batch_size}, {dtype.name}, {args.attention} attention")

    graphdef, params = nnx.split(model)
    opt_state = optimizer.init(params)
    params, opt_state = replicate((params, opt_state), devices)
    train_step = jax.pmap(make_train_step(graphdef, optimizer, axis_name="data"),
                          axis_name="data", donate_argnums=(0, 1))
    progress = Progress(config.steps, config.batch_size * config.seq_len, args.log_every)
    data = batches(tokens, config.batch_size, config.seq_len)
    for step in range(1, config.steps + 1):
        batch = next(data).reshape(len(devices), -1, config.seq_len + 1)
        params, opt_state, loss = train_step(params, opt_state, batch)
        progress(step, loss[0])
    print(f"training: {progress.tokens_per_second(config.steps):,.0f} tokens/s after the first "
          "step")

    replicas_agree = jax.tree.map(lambda x: np.allclose(x[0], x[-1]), params)
    if not all(jax.tree.leaves(replicas_agree)):
        raise SystemExit("the replicas' parameters diverged")
    if args.generate:
        nnx.update(model, jax.tree.map(lambda x: x[0], params))
        sample(model, tokenizer, dtype, args, config)


if __name__ == "__main__":
    main()
