"""The BabyAI agent: a Flax (linen) transformer trained from scratch by behavioral cloning.

Three pathways, in the order data flows:

1. Instruction: word + position embeddings -> transformer encoder -> pooled vector ``z``. It sees no
   observation, so ``z`` is a property of the instruction alone: the action-grounded embedding the study
   compares with language models.
2. Observation, per step: each of the 7x7 cells embeds (object, colour, state, cell position); FiLM by ``z``
   (scale and shift, then GELU) decides what each cell means for this instruction, and multi-head attention
   pooling with a query made from ``z`` reads the cells out into one vector, to which the agent's direction
   is added.
3. Memory: a causal transformer over the steps of a window (BabyAI is partially observable: the agent
   must remember objects it turned away from), with ``z`` added to every step; a linear head gives the
   7 action logits. A training row packs several short windows; a segment mask keeps them apart, so
   each window gets exactly the logits it would get alone.

The policy sees the instruction only through ``z``: whatever it must know to act is in that vector.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import TYPE_CHECKING

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from minigrid.core.constants import COLOR_TO_IDX, OBJECT_TO_IDX, STATE_TO_IDX

if TYPE_CHECKING:
    from lvaa_jax.babyai import Tokenizer

NUM_ACTIONS = 7
GRID = 7
POOLINGS = ("mean", "max", "first")


class MLP(nn.Module):
    width: int
    hidden: int
    dtype: jnp.dtype

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = nn.gelu(nn.Dense(self.hidden, dtype=self.dtype)(x))
        return nn.Dense(self.width, dtype=self.dtype)(x)


def embedding(num_embeddings: int, features: int, name: str) -> nn.Embed:
    """A float32 lookup table initialised N(0, 1), read by gathers; callers cast what they read.

    A gather's gradient is a scatter-add: on XLA:CPU faster than one-hot @ table (whose gradient needs the
    cotangent transposed). Every gather here reads float32, so that scatter-add accumulates in float32:
    in bfloat16, XLA:GPU runs it as a compare-and-swap loop that serialises on the rows most indices share
    (openxla/xla#26371; the empty cell at each grid position, the four directions), and it would sum
    thousands of gradients per row at bfloat16 precision."""
    return nn.Embed(num_embeddings, features, embedding_init=nn.initializers.normal(1.0), name=name)


@jax.custom_vjp
def normalize(x: jax.Array) -> jax.Array:
    """Zero mean, unit variance over the last axis (statistics in float32, epsilon 1e-6, as
    ``nn.LayerNorm``), with a hand-written backward pass: XLA:CPU runs the autodiff of the statistics as
    separate reduction passes: 2.6x slower for the cell pathway's LayerNorm+FiLM+GELU (18 vs 7 ms
    forward and backward on a default batch), 1.10x for the whole default step."""
    return _normalize_forward(x)[0]


def _normalize_forward(x: jax.Array) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    x32 = x.astype(jnp.float32)
    mean = x32.mean(-1, keepdims=True)
    variance = jnp.maximum((x32 * x32).mean(-1, keepdims=True) - mean * mean, 0.0)
    inverse_std = jax.lax.rsqrt(variance + 1e-6)
    normed = (x32 - mean) * inverse_std
    return normed.astype(x.dtype), (normed, inverse_std)


def _normalize_backward(saved: tuple[jax.Array, jax.Array], grad: jax.Array) -> tuple[jax.Array]:
    normed, inverse_std = saved
    g = grad.astype(jnp.float32)
    dx = inverse_std * (g - g.mean(-1, keepdims=True) - normed * (g * normed).mean(-1, keepdims=True))
    return (dx.astype(grad.dtype),)


normalize.defvjp(_normalize_forward, _normalize_backward)


class LayerNorm(nn.Module):
    """``nn.LayerNorm`` (same parameters, names and values) on :func:`normalize`."""

    dtype: jnp.dtype

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = normalize(x.astype(self.dtype))
        width = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (width,)).astype(self.dtype)
        bias = self.param("bias", nn.initializers.zeros, (width,)).astype(self.dtype)
        return x * scale + bias


class Block(nn.Module):
    """Pre-norm transformer block; ``mask`` is an attention mask [B, 1, Q, K]."""

    num_heads: int
    mlp_ratio: int
    dropout: float
    dtype: jnp.dtype

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array, train: bool) -> jax.Array:
        width = x.shape[-1]
        h = LayerNorm(self.dtype)(x)
        h = nn.MultiHeadDotProductAttention(
            self.num_heads, dtype=self.dtype, dropout_rate=self.dropout, deterministic=not train,
            force_fp32_for_softmax=True,
        )(h, h, mask=mask)
        x = x + nn.Dropout(self.dropout, deterministic=not train)(h)
        h = MLP(width, width * self.mlp_ratio, self.dtype)(LayerNorm(self.dtype)(x))
        return x + nn.Dropout(self.dropout, deterministic=not train)(h)


def pool(states: jax.Array, mask: jax.Array, how: str) -> jax.Array:
    """Pools token states [..., L, D] over real tokens (``mask`` [..., L]) into [..., D]."""
    m = mask[..., None]
    if how == "mean":
        return (states * m).sum(-2) / jnp.maximum(m.sum(-2), 1)
    if how == "max":
        return jnp.where(m, states, jnp.finfo(states.dtype).min).max(-2)
    if how == "first":
        return states[..., 0, :]
    raise ValueError(f"unknown pooling {how!r}; known: {POOLINGS}")


class InstructionEncoder(nn.Module):
    vocab_size: int
    max_length: int
    width: int
    num_layers: int
    num_heads: int
    mlp_ratio: int
    dropout: float
    pooling: str
    dtype: jnp.dtype

    @nn.compact
    def __call__(self, tokens: jax.Array, token_mask: jax.Array, train: bool = False) -> jax.Array:
        """Pooled embeddings after the input layer and after every block: [num_layers + 1, B, width].

        The last entry (after the final LayerNorm) is the vector ``z`` the policy uses.
        """
        x = embedding(self.vocab_size, self.width, name="words")(tokens).astype(self.dtype)
        positions = self.param("positions", nn.initializers.normal(1.0), (self.max_length, self.width))
        x = x + positions[: tokens.shape[-1]].astype(self.dtype)
        mask = nn.make_attention_mask(token_mask, token_mask)
        pooled = [pool(x, token_mask, self.pooling)]
        for i in range(self.num_layers):
            x = Block(self.num_heads, self.mlp_ratio, self.dropout, self.dtype, name=f"block{i}")(x, mask, train)
            if i < self.num_layers - 1:
                pooled.append(pool(x, token_mask, self.pooling))
        pooled.append(pool(LayerNorm(self.dtype, name="norm")(x), token_mask, self.pooling))
        return jnp.stack(pooled)


class ObservationEncoder(nn.Module):
    """Cells modulated by the instruction, then read out by attention pooling under the instruction.

    Every cell of every step passes through this pathway (32 rows x 16 steps x 49 cells = 25k cells per
    default batch), so it has no per-cell matmul: a cell is the normalised sum of its object, colour,
    state and position embeddings, looked up in a table of every combination; FiLM by ``z`` is
    elementwise; and the pooling is multi-head attention with a single query (made from ``z``) written
    with the query folded into the keys (a linear map of ``z``) and the value and output projections
    folded into one Dense after pooling: it can express what ``nn.MultiHeadDotProductAttention`` with one
    query does, at the cost of a [cells, heads] score map instead of per-cell key and value projections.
    """

    width: int
    cell_width: int
    num_heads: int
    dtype: jnp.dtype

    def setup(self):
        width, dtype = self.cell_width, self.dtype
        self.object = embedding(len(OBJECT_TO_IDX), width, name="object")
        self.colour = embedding(len(COLOR_TO_IDX), width, name="colour")
        self.state = embedding(len(STATE_TO_IDX), width, name="state")
        self.cell = self.param("cell", nn.initializers.normal(1.0), (GRID * GRID, width))
        # FiLM starts as the identity and the instruction's modulation grows from zero: with the default
        # (LeCun) init, (1 + scale) starts with std 1 per channel, driven mostly by what all instructions
        # share, and one seed in four sat ~1 000 steps on a plateau at 0.81 training accuracy.
        self.film = nn.Dense(2 * width, dtype=dtype, kernel_init=nn.initializers.zeros, name="film")
        self.query = nn.Dense(width * self.num_heads, dtype=dtype, name="query")
        self.readout = nn.Dense(self.width, dtype=dtype, name="readout")
        self.direction = embedding(4, self.width, name="direction")

    def normalized_cells(self, image: jax.Array) -> jax.Array:
        """normalize(object + colour + state + cell-position embeddings) of every cell: [B, T, 49, cell_width].

        Computed for every combination (objects * colours * states * 49 rows, 1.2 MB at the default width)
        and gathered: LayerNorm runs on that table instead of on every cell of the batch, and one gather
        replaces three (the default step 1.15x faster on XLA:CPU, measured A/B; same function, same
        parameters)."""
        table = (
            self.object.embedding[:, None, None, None] + self.colour.embedding[:, None, None]
            + self.state.embedding[:, None] + self.cell
        )
        table = normalize(table).reshape(-1, self.cell_width)  # float32, read by a gather (see `embedding`)
        image = image.astype(jnp.int32).reshape(*image.shape[:2], GRID * GRID, 3)
        combination = (image[..., 0] * len(COLOR_TO_IDX) + image[..., 1]) * len(STATE_TO_IDX) + image[..., 2]
        return table[combination * GRID * GRID + jnp.arange(GRID * GRID)].astype(self.dtype)

    def __call__(self, image: jax.Array, direction: jax.Array, z: jax.Array) -> jax.Array:
        """image uint8 [B, T, 7, 7, 3], direction [B, T], each step's instruction vector z [B, T, D] -> step
        vectors [B, T, D]."""
        cell_width, heads = self.cell_width, self.num_heads
        scale, shift = jnp.split(self.film(z), 2, axis=-1)
        cells = nn.gelu(self.normalized_cells(image) * (1 + scale[:, :, None]) + shift[:, :, None])
        keys = self.query(z).reshape(*z.shape[:2], cell_width, heads)
        scores = jnp.einsum("btnc,btch->btnh", cells, keys) / jnp.sqrt(cell_width).astype(self.dtype)
        weights = jax.nn.softmax(scores.astype(jnp.float32), axis=2).astype(self.dtype)
        read = jnp.einsum("btnh,btnc->bthc", weights, cells).reshape(*cells.shape[:2], heads * cell_width)
        return self.readout(read) + self.direction(direction).astype(self.dtype)


class Agent(nn.Module):
    """Action logits [B, T, 7] from an instruction and a window of observations."""

    vocab_size: int
    max_instruction_length: int
    context: int
    width: int = 128
    cell_width: int = 32
    num_heads: int = 4
    instruction_layers: int = 2
    memory_layers: int = 2
    mlp_ratio: int = 4
    pooling: str = "mean"
    dropout: float = 0.0
    dtype: jnp.dtype = jnp.float32

    @classmethod
    def from_config(cls, model: ml_collections.ConfigDict, vocab_size: int, max_instruction_length: int) -> Agent:
        return cls(
            vocab_size=vocab_size, max_instruction_length=max_instruction_length, context=model.context,
            width=model.width, cell_width=model.cell_width, num_heads=model.num_heads, instruction_layers=model.instruction_layers,
            memory_layers=model.memory_layers, mlp_ratio=model.mlp_ratio, pooling=model.pooling,
            dropout=model.dropout, dtype=jnp.dtype(model.dtype),
        )

    def setup(self):
        self.instruction = InstructionEncoder(
            self.vocab_size, self.max_instruction_length, self.width, self.instruction_layers, self.num_heads,
            self.mlp_ratio, self.dropout, self.pooling, self.dtype,
        )
        self.observation = ObservationEncoder(self.width, self.cell_width, self.num_heads, self.dtype)
        self.step_position = self.param("step_position", nn.initializers.normal(1.0), (self.context, self.width))
        self.memory = [
            Block(self.num_heads, self.mlp_ratio, self.dropout, self.dtype) for _ in range(self.memory_layers)
        ]
        self.norm = LayerNorm(self.dtype)
        self.head = nn.Dense(NUM_ACTIONS, dtype=jnp.float32)

    def embed_instruction(self, tokens: jax.Array, token_mask: jax.Array, train: bool = False) -> jax.Array:
        """[instruction_layers + 1, B, width]: the instruction pathway alone, pooled at every layer."""
        return self.instruction(tokens, token_mask, train)

    def observe(self, image: jax.Array, direction: jax.Array, z: jax.Array) -> jax.Array:
        """Step vectors [B, T, width]: each observation read out under its instruction vector ``z`` [B, T, D]."""
        return self.observation(image, direction, z)

    def act(self, steps: jax.Array, z: jax.Array, segment: jax.Array | None = None,
            position: jax.Array | None = None, train: bool = False) -> jax.Array:
        """Action logits [B, T, 7] from the step vectors of a row (causal: step t sees steps <= t of its own
        window). ``z`` [B, T, D] (or [B, 1, D]) is each step's instruction vector; ``segment`` and
        ``position`` [B, T] say which window of the row a step belongs to and where in it (default: the
        row is one window)."""
        if position is None:
            position = jnp.arange(steps.shape[1])
        x = steps + self.step_position[position].astype(self.dtype) + z
        t = jnp.arange(x.shape[1])
        attend = (t[:, None] >= t[None, :])[None]  # [1, query, key]
        if segment is not None:
            attend = attend & (segment[:, :, None] == segment[:, None, :])
        attend = attend[:, None]  # one mask for every head
        for block in self.memory:
            x = block(x, attend, train)
        return self.head(self.norm(x)).astype(jnp.float32)

    def __call__(self, batch: dict[str, jax.Array], train: bool = False) -> jax.Array:
        """Logits [B, T, 7] of a batch of rows (see ``lvaa_jax.babyai.WindowBatches``): the row's instructions
        [B, S, L] are encoded once each and every step reads its own window's vector."""
        tokens, token_mask = batch["tokens"], batch["token_mask"]
        rows, windows, length = tokens.shape
        z = self.embed_instruction(tokens.reshape(-1, length), token_mask.reshape(-1, length), train)[-1]
        z = z.astype(jnp.float32).reshape(rows, windows, -1)  # a float32 gather (see `embedding`)
        z = jnp.take_along_axis(z, batch["segment"][..., None], axis=1).astype(self.dtype)
        steps = self.observe(batch["image"], batch["direction"], z)
        return self.act(steps, z, batch["segment"], batch["position"], train)


@functools.partial(jax.jit, static_argnames=("model", "layers"))
def instruction_embedding(
    params, token_ids: jax.Array, mask: jax.Array, *, model: Agent, layers: tuple[int, ...] | None = None
) -> jax.Array:
    """The agent's embedding of instructions, from the instruction pathway alone: [B, width] (policy's
    vector ``z``), or [len(layers), B, width] for the given layer indices (0 = input embeddings)."""
    pooled = model.apply({"params": params}, token_ids, mask, method=Agent.embed_instruction)
    return pooled[-1] if layers is None else pooled[jnp.asarray(layers)]


def embed_instructions(model: Agent, params, tokenizer: Tokenizer, instructions: Sequence[str],
                       all_layers: bool = True) -> np.ndarray:
    """float32 [layers, N, width] (or [N, width]): the instruction pathway's pooled embeddings of ``instructions``.

    The parameters are copied to the host first, so the computation runs on one device wherever they live
    (replicated over a training mesh, or restored from a checkpoint): the same parameters give the same
    table bit for bit, which is how a snapshot of training equals the ``action`` table of its checkpoint.
    """
    tokens, mask = tokenizer.encode_batch(instructions, model.max_instruction_length)
    layers = tuple(range(model.instruction_layers + 1)) if all_layers else None
    pooled = instruction_embedding(jax.device_get(params), tokens, mask, model=model, layers=layers)
    return np.asarray(pooled, np.float32)
