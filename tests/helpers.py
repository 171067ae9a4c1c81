"""Small helpers shared by test modules."""
import jax


def init_params(layer, key, in_shape):
    """layer.init under one jit (eager init dispatches, and compiles, op by op)."""
    box = []

    def run(k):
        out_shape, params = layer.init(k, in_shape)
        box.append(tuple(out_shape))
        return params

    params = jax.jit(run)(key)
    return box[0], params
