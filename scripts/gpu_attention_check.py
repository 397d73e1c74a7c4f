"""On a GPU: cuDNN flash attention (`attention_impl="cudnn"`) against the XLA path, bf16, left padding.

Prints the relative error of the logits and of the parameter gradients (`‖a - b‖ / ‖b‖`, over valid tokens) and
exits 1 when either is above 2e-2 (bf16 operands land between 1e-3 and 1e-2). Run before the GPU benchmark, which
uses the cuDNN path by default (`attention_impl="auto"`).
"""

import sys

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from models import ModelConfig, init_model


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def flat(tree):
    return np.concatenate([np.ravel(np.asarray(x, np.float32)) for x in jax.tree.leaves(tree)])


def main() -> int:
    print(f"backend {jax.default_backend()}, devices {jax.devices()}")
    if jax.default_backend() != "gpu":
        print("no GPU backend: nothing to check")
        return 0
    failures = 0
    for heads, kv, head_dim in ((14, 2, 64), (12, 2, 128)):
        cfg = ModelConfig(model_type="qwen2", vocab_size=1024, hidden_size=heads * head_dim, intermediate_size=512,
                          num_hidden_layers=2, num_attention_heads=heads, num_key_value_heads=kv, head_dim=head_dim,
                          qkv_bias=True)
        model = init_model(cfg, key=jax.random.key(0), dtype=jnp.bfloat16)
        ids = jax.random.randint(jax.random.key(1), (4, 256), 0, cfg.vocab_size)
        mask = jnp.ones((4, 256), jnp.int32).at[1, :37].set(0).at[3, :200].set(0)  # left padding

        def loss(m, ids, mask, impl):
            logits = m(ids, attention_mask=mask, attention_impl=impl).logits.astype(jnp.float32)
            return jnp.sum(jnp.where(mask[..., None] > 0, logits, 0.0) ** 2) / 1e4, logits

        run = eqx.filter_jit(eqx.filter_value_and_grad(loss, has_aux=True))
        (_, fast), g_fast = run(model, ids, mask, "cudnn")
        (_, ref), g_ref = run(model, ids, mask, "xla")
        valid = np.asarray(mask, bool)
        e_logits = rel(np.asarray(fast)[valid], np.asarray(ref)[valid])
        e_grad = rel(flat(g_fast), flat(g_ref))
        ok = e_logits < 2e-2 and e_grad < 2e-2 and np.isfinite(np.asarray(fast)).all()
        failures += not ok
        print(f"heads {heads}/{kv} head_dim {head_dim}: logits rel err {e_logits:.2e}, grads rel err {e_grad:.2e}"
              f" -> {'ok' if ok else 'FAIL'}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
