"""The agent of lvaa_jax/agent/model.py written in eager PyTorch: the reference for train_throughput.

Same pathways, widths, heads and parameter count; written as one would in PyTorch (nn.Embedding,
nn.MultiheadAttention), not as a line-by-line translation of the Flax code.
"""

import torch
import torch.nn.functional as F
from torch import nn

GRID_CELLS = 49


class MLP(nn.Sequential):
    def __init__(self, width: int, hidden: int):
        super().__init__(nn.Linear(width, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, width))


class Block(nn.Module):
    def __init__(self, width: int, heads: int, mlp_ratio: int):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.attention = nn.MultiheadAttention(width, heads, batch_first=True)
        self.mlp = MLP(width, width * mlp_ratio)

    def forward(self, x, key_padding_mask=None, attn_mask=None):
        h = self.norm1(x)
        x = x + self.attention(h, h, h, key_padding_mask=key_padding_mask, attn_mask=attn_mask, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class ObservationEncoder(nn.Module):
    """Embedded cells (one lookup in a normalised table of every cell combination), FiLM by z, then
    multi-head attention pooling with the query folded into the keys."""

    def __init__(self, width: int, cell_width: int, heads: int):
        super().__init__()
        self.cell_width, self.heads = cell_width, heads
        self.object, self.colour, self.state = nn.Embedding(11, cell_width), nn.Embedding(6, cell_width), nn.Embedding(3, cell_width)
        self.cell = nn.Parameter(torch.randn(GRID_CELLS, cell_width))
        self.film, self.norm = nn.Linear(width, 2 * cell_width), nn.LayerNorm(cell_width, elementwise_affine=False)
        self.query = nn.Linear(width, cell_width * heads)
        self.readout = nn.Linear(cell_width * heads, width)
        self.direction = nn.Embedding(4, width)
        self.register_buffer("cell_index", torch.arange(GRID_CELLS), persistent=False)

    def normalized_cell_table(self):
        """Every (object, colour, state, cell) combination, summed and normalised, as the Flax model does."""
        table = (self.object.weight[:, None, None, None] + self.colour.weight[:, None, None]
                 + self.state.weight[:, None] + self.cell)
        return self.norm(table).flatten(0, 3)

    def forward(self, image, direction, z):
        """z: each step's instruction vector [B, T, D]."""
        image = image.long().flatten(2, 3)  # [B, T, 49, 3]
        colours, states = self.colour.num_embeddings, self.state.num_embeddings
        index = ((image[..., 0] * colours + image[..., 1]) * states + image[..., 2]) * GRID_CELLS + self.cell_index
        scale, shift = self.film(z)[:, :, None].chunk(2, dim=-1)
        cells = F.gelu(F.embedding(index, self.normalized_cell_table()) * (1 + scale) + shift, approximate="tanh")
        keys = self.query(z).view(*z.shape[:2], self.cell_width, self.heads)
        weights = torch.einsum("btnc,btch->btnh", cells, keys).div(self.cell_width**0.5).softmax(dim=2)
        read = torch.einsum("btnh,btnc->bthc", weights, cells).flatten(2)
        return self.readout(read) + self.direction(direction.long())


class TorchAgent(nn.Module):
    def __init__(self, config, vocab_size: int, max_length: int):
        super().__init__()
        d, c, heads = config.width, config.cell_width, config.num_heads
        self.words = nn.Embedding(vocab_size, d)
        self.positions = nn.Parameter(torch.randn(max_length, d))
        self.instruction = nn.ModuleList(Block(d, heads, config.mlp_ratio) for _ in range(config.instruction_layers))
        self.instruction_norm = nn.LayerNorm(d)
        self.observation = ObservationEncoder(d, c, heads)
        self.step_position = nn.Parameter(torch.randn(config.context, d))
        self.memory = nn.ModuleList(Block(d, heads, config.mlp_ratio) for _ in range(config.memory_layers))
        self.norm, self.head = nn.LayerNorm(d), nn.Linear(d, 7)
        self.heads = heads

    def embed_instruction(self, tokens, token_mask):
        x = self.words(tokens) + self.positions[: tokens.shape[1]]
        for block in self.instruction:
            x = block(x, key_padding_mask=~token_mask)
        m = token_mask[..., None].float()
        return (self.instruction_norm(x) * m).sum(1) / m.sum(1).clamp(min=1)

    def forward(self, batch):
        """A batch of packed rows (lvaa_jax.babyai.WindowBatches). Eager PyTorch encodes only the used
        instruction slots (the jitted step, with static shapes, encodes all of them)."""
        tokens, token_mask, segment = batch["tokens"].long(), batch["token_mask"], batch["segment"].long()
        rows, windows, _ = tokens.shape
        used = token_mask.any(-1).flatten()
        z = self.embed_instruction(tokens.flatten(0, 1)[used], token_mask.flatten(0, 1)[used])
        rank = (used.cumsum(0) - 1).view(rows, windows)  # row and slot -> index in z
        z = z[rank.gather(1, segment)]  # each step's instruction vector [B, T, D]
        steps = self.observation(batch["image"], batch["direction"], z)
        return self.act(steps, z, segment, batch["position"].long())

    def act(self, steps, z, segment, position):
        """Action logits from a row's step vectors: causal attention within each packed window."""
        x = steps + self.step_position[position] + z
        t = x.shape[1]
        causal = torch.triu(torch.ones(t, t, dtype=torch.bool, device=x.device), diagonal=1)
        blocked = causal | (segment[:, :, None] != segment[:, None, :])  # True: may not attend
        blocked = blocked.repeat_interleave(self.heads, dim=0)
        for block in self.memory:
            x = block(x, attn_mask=blocked)
        return self.head(self.norm(x))


def torch_step(model: TorchAgent, optimizer, batch, grad_clip: float, autocast: torch.dtype | None = None):
    with torch.autocast(batch["image"].device.type, dtype=autocast, enabled=autocast is not None):
        logits = model(batch).float()
    mask = batch["mask"].float()
    nll = F.cross_entropy(logits.flatten(0, 1), batch["action"].long().flatten(), reduction="none")
    loss = (nll * mask.flatten()).sum() / mask.sum().clamp(min=1)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    return loss.detach()
