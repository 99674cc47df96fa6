"""The flagship question (Stack Overflow 58612783, "Batch normalization, yes or no?") through
ablab's Python API, in Keras' own vocabulary: the models as functions, the data as arrays,
``compile`` and ``fit`` arguments as the question wrote them -- over 200 paired seeds.

    python examples/notebook_api.py          # or paste the cells into a notebook

The same study as examples/bn_yes_or_no.toml (its plain and bn variants).
"""

# %%
import os

os.environ.setdefault("KERAS_BACKEND", "jax")  # before Keras is imported: ablab runs on JAX

import keras
import numpy as np

import ablab

# The question's data: np.random.seed(1); x = normal(0, 1, (100, 12)); the target is the input.
np.random.seed(1)
x_train = np.random.normal(0, 1, (100, 12))


def build_plain() -> keras.Model:
    """Dense(8) -> Dense(12): the linear autoencoder without BatchNormalization."""
    return keras.Sequential([keras.Input((12,)), keras.layers.Dense(8), keras.layers.Dense(12)])


def build_bn() -> keras.Model:
    """The question's model with its BatchNormalization line enabled."""
    return keras.Sequential(
        [
            keras.Input((12,)),
            keras.layers.Dense(8),
            keras.layers.BatchNormalization(),
            keras.layers.Activation("linear"),
            keras.layers.Dense(12),
            keras.layers.Activation("linear"),
        ]
    )


# %%
result = ablab.ablate(
    {"plain": build_plain, "bn": build_bn},
    x_train,
    x_train,
    compile=dict(optimizer="adam", loss="mse"),
    fit=dict(epochs=20, batch_size=32, validation_split=0.1, shuffle=False),
    seeds=200,
    name="bn_yes_or_no_api",
)

# %%
# In a notebook, `result` alone renders as a table; result.plot() draws the overview.
for variant, summary in result.summary.items():
    final = summary["final_val_loss"]
    print(
        f"{variant:6s} median final val_loss {final['median']:.4f} over {summary['n_seeds']} seeds"
    )
for c in result.comparisons:
    print(
        f"{c.variant} vs {c.baseline}: Δ mean {c.diff_mean:+.4f} "
        f"[{c.ci_low:+.4f}, {c.ci_high:+.4f}], P(better) {c.prob_better:.2f} -> {c.verdict}"
    )
print(f"stored in {result.run_dir} (ablab show {result.run_id}; ablab report {result.run_id})")

# %%
# Later, in another session: the same result from the runs folder.
again = ablab.open_run(result.run_id)
assert [c.verdict for c in again.comparisons] == [c.verdict for c in result.comparisons]
