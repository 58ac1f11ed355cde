"""Train a small GPT (Flax nnx + optax) whose attention is jax-flash, then generate text with its
KV cache.

    python examples/train_gpt.py --tiny                # a CPU-sized model, under 2 minutes
    python examples/train_gpt.py                       # a GPU-sized model
    python examples/train_gpt.py --attention flax      # the same with Flax's default attention

The data is generated here, no download: character-level sentences from a small grammar
("the red cat sees a dog."), which a small model learns within a few hundred steps. The
training step is one jax.jit; examples/train_gpt_pmap.py runs the same step under jax.pmap.
"""

import argparse
import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jax_flash.flax_modules import FlashMultiHeadAttention


@dataclasses.dataclass(frozen=True)
class Config:
    num_layers: int
    num_heads: int
    model_dim: int
    seq_len: int
    batch_size: int
    steps: int
    learning_rate: float


TINY = Config(num_layers=2, num_heads=4, model_dim=64, seq_len=64, batch_size=16, steps=200,
              learning_rate=3e-3)
GPU = Config(num_layers=6, num_heads=8, model_dim=512, seq_len=1024, batch_size=32, steps=300,
             learning_rate=1e-3)


# ---- data -------------------------------------------------------------------------------------

_WORDS = {
    "article": ["the", "a"],
    "adjective": ["red", "small", "quiet", "old", "green", "happy"],
    "noun": ["cat", "dog", "bird", "fox", "child", "tree", "river"],
    "verb": ["sees", "likes", "follows", "finds", "hears"],
}


def make_corpus(num_sentences: int, seed: int = 0) -> str:
    """Sentences 'article [adjective] noun verb article [adjective] noun.' drawn at random."""
    rng = np.random.default_rng(seed)
    pick = lambda kind: _WORDS[kind][rng.integers(len(_WORDS[kind]))]  # noqa: E731

    def noun_phrase():
        words = [pick("article")] + ([pick("adjective")] if rng.random() < 0.5 else [])
        return words + [pick("noun")]

    return " ".join(" ".join(noun_phrase() + [pick("verb")] + noun_phrase()) + "."
                    for _ in range(num_sentences))


class CharTokenizer:
    def __init__(self, text: str):
        self.chars = sorted(set(text))
        self.index = {c: i for i, c in enumerate(self.chars)}

    def encode(self, text: str) -> np.ndarray:
        return np.array([self.index[c] for c in text], np.int32)

    def decode(self, tokens) -> str:
        return "".join(self.chars[int(t)] for t in tokens)


def batches(tokens: np.ndarray, batch_size: int, seq_len: int, seed: int = 0):
    """Endless random windows of seq_len + 1 tokens: inputs and their next-token targets."""
    rng = np.random.default_rng(seed)
    while True:
        starts = rng.integers(0, len(tokens) - seq_len - 1, batch_size)
        yield np.stack([tokens[s:s + seq_len + 1] for s in starts])


# ---- model ------------------------------------------------------------------------------------

class Block(nnx.Module):
    def __init__(self, config: Config, attention_cls, dtype, rngs: nnx.Rngs):
        dim = config.model_dim
        self.attention_norm = nnx.LayerNorm(dim, dtype=dtype, rngs=rngs)
        # FlashMultiHeadAttention takes nnx.MultiHeadAttention's arguments: swapping the class
        # is the whole switch.
        self.attention = attention_cls(config.num_heads, dim, decode=False, dtype=dtype,
                                       rngs=rngs)
        self.mlp_norm = nnx.LayerNorm(dim, dtype=dtype, rngs=rngs)
        self.mlp_in = nnx.Linear(dim, 4 * dim, dtype=dtype, rngs=rngs)
        self.mlp_out = nnx.Linear(4 * dim, dim, dtype=dtype, rngs=rngs)

    def __call__(self, x, decode: bool):
        # Training is causal; decoding sees the cache up to each position (is_causal would align
        # one query to the first key instead).
        x = x + self.attention(self.attention_norm(x), is_causal=not decode, decode=decode)
        return x + self.mlp_out(jax.nn.gelu(self.mlp_in(self.mlp_norm(x))))


class GPT(nnx.Module):
    def __init__(self, config: Config, vocab_size: int, attention_cls, dtype, rngs: nnx.Rngs):
        self.config = config
        self.token_embedding = nnx.Embed(vocab_size, config.model_dim, dtype=dtype, rngs=rngs)
        self.position_embedding = nnx.Embed(config.seq_len, config.model_dim, dtype=dtype,
                                            rngs=rngs)
        self.blocks = nnx.List([Block(config, attention_cls, dtype, rngs)
                                for _ in range(config.num_layers)])
        self.final_norm = nnx.LayerNorm(config.model_dim, dtype=dtype, rngs=rngs)
        self.head = nnx.Linear(config.model_dim, vocab_size, dtype=dtype, rngs=rngs)

    def __call__(self, tokens, positions, decode: bool = False):
        """tokens, positions: [batch, length] int -> logits [batch, length, vocab] float32."""
        x = self.token_embedding(tokens) + self.position_embedding(positions)
        for block in self.blocks:
            x = block(x, decode)
        return self.head(self.final_norm(x)).astype(jnp.float32)

    def init_cache(self, batch_size: int, dtype):
        for block in self.blocks:
            block.attention.init_cache((batch_size, self.config.seq_len, self.config.model_dim),
                                       dtype)


# ---- training ---------------------------------------------------------------------------------

def make_train_step(graphdef, optimizer, axis_name=None):
    """(params, opt_state, batch [b, seq_len + 1]) -> (params, opt_state, loss). With axis_name,
    gradients and loss are averaged over that pmap axis."""

    def train_step(params, opt_state, batch):
        inputs, targets = batch[:, :-1], batch[:, 1:]
        positions = jnp.broadcast_to(jnp.arange(inputs.shape[1]), inputs.shape)

        def loss_fn(params):
            logits = nnx.merge(graphdef, params)(inputs, positions)
            return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()

        loss, grads = jax.value_and_grad(loss_fn)(params)
        if axis_name is not None:
            loss, grads = jax.lax.pmean((loss, grads), axis_name)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return train_step


class Progress:
    """A one-line progress bar with the loss and throughput (plain printing), redrawn every
    `redraw` steps; a loss line is kept every `log_every` steps. Throughput counts from the end
    of the first step, which includes compilation."""

    def __init__(self, total: int, tokens_per_step: int, log_every: int):
        self.total, self.tokens_per_step, self.log_every = total, tokens_per_step, log_every
        self.redraw = max(1, total // 50)
        self.start = None  # (time, step) after the first step

    def __call__(self, step: int, loss):
        """Reading the loss waits for the step: only done when something is printed."""
        if self.start is None:
            float(loss)
            self.start = (time.perf_counter(), step)
        keep = step % self.log_every == 0 or step == self.total
        if not keep and step % self.redraw:
            return
        loss = float(loss)
        done = 30 * step // self.total
        print(f"\r[{'#' * done}{' ' * (30 - done)}] step {step}/{self.total} loss {loss:.3f} "
              f"{self.tokens_per_second(step):,.0f} tokens/s", end="\n" if keep else "",
              flush=True)

    def tokens_per_second(self, step: int) -> float:
        start_time, start_step = self.start
        elapsed = time.perf_counter() - start_time
        return (step - start_step) * self.tokens_per_step / elapsed if elapsed > 0 else 0.0


# ---- generation -------------------------------------------------------------------------------

def generate(model: GPT, prompt: np.ndarray, num_tokens: int, dtype, chunked_prefill: bool):
    """Greedy decoding with the KV cache: prompt [batch, length] -> [batch, num_tokens].

    The cache is donated to each jitted step, so it is updated in place. jax-flash's module
    takes the whole prompt in one call (chunked_prefill); Flax's takes one token at a time.
    """
    batch, prompt_len = prompt.shape
    if prompt_len + num_tokens > model.config.seq_len:
        raise ValueError(f"prompt ({prompt_len}) + num_tokens ({num_tokens}) exceeds seq_len "
                         f"{model.config.seq_len}")
    model.init_cache(batch, dtype)
    graphdef, params, cache = nnx.split(model, nnx.Param, nnx.Cache)

    def step(params, cache, tokens, start):
        model = nnx.merge(graphdef, params, cache)
        positions = start + jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
        logits = model(tokens, positions, decode=True)
        return jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32), nnx.state(model, nnx.Cache)

    step = jax.jit(step, donate_argnums=1)
    prompt = jnp.asarray(prompt)
    chunks = [prompt] if chunked_prefill else [prompt[:, i:i + 1] for i in range(prompt_len)]
    start = 0
    for chunk in chunks:
        next_token, cache = step(params, cache, chunk, start)
        start += chunk.shape[1]
    generated = [next_token]
    for _ in range(num_tokens - 1):
        next_token, cache = step(params, cache, next_token[:, None], start)
        start += 1
        generated.append(next_token)
    return np.stack(jax.device_get(generated), axis=1)


# ---- main -------------------------------------------------------------------------------------

def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="the CPU-sized configuration")
    parser.add_argument("--steps", type=int, help="training steps (default: the config's)")
    parser.add_argument("--batch-size", type=int, help="sequences per step")
    parser.add_argument("--seq-len", type=int, help="tokens per sequence (default: the config's)")
    parser.add_argument("--attention", choices=["flash", "flax"], default="flash",
                        help="jax-flash's FlashMultiHeadAttention or nnx.MultiHeadAttention")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                        help="computation dtype (default: bfloat16 on GPU, float32 on CPU)")
    parser.add_argument("--log-every", type=int, default=50, help="steps between loss lines")
    parser.add_argument("--generate", type=int, default=48, help="tokens to generate (0: none)")
    return parser.parse_args(argv)


def setup(args):
    config = TINY if args.tiny else GPU
    config = dataclasses.replace(config, steps=args.steps or config.steps,
                                 batch_size=args.batch_size or config.batch_size,
                                 seq_len=args.seq_len or config.seq_len)
    dtype = jnp.dtype(args.dtype or ("bfloat16" if jax.default_backend() == "gpu"
                                     else "float32"))
    text = make_corpus(20_000)
    tokenizer = CharTokenizer(text)
    attention_cls = FlashMultiHeadAttention if args.attention == "flash" else (
        nnx.MultiHeadAttention)
    model = GPT(config, len(tokenizer.chars), attention_cls, dtype, nnx.Rngs(0))
    optimizer = optax.adamw(config.learning_rate)
    return config, dtype, tokenizer, tokenizer.encode(text), model, optimizer


def sample(model, tokenizer, dtype, args, config):
    prompts = ["the red cat ", "a small dog "]  # equal lengths: one position for the batch
    prompt = np.stack([tokenizer.encode(p) for p in prompts])
    num_tokens = min(args.generate, config.seq_len - prompt.shape[1])
    out = generate(model, prompt, num_tokens, dtype, chunked_prefill=args.attention == "flash")
    for p, tokens in zip(prompt, out):
        print(f"  {tokenizer.decode(p)!r} -> {tokenizer.decode(tokens)!r}")


def main(argv=None):
    args = parse_args(argv)
    config, dtype, tokenizer, tokens, model, optimizer = setup(args)
    print(f"{jax.devices()[0].platform}: {config.num_layers} layers, {config.num_heads} heads, "
          f"dim {config.model_dim}, seq_len {config.seq_len}, batch {config.batch_size}, "
          f"{dtype.name}, {args.attention} attention")

    graphdef, params = nnx.split(model)
    opt_state = optimizer.init(params)
    train_step = jax.jit(make_train_step(graphdef, optimizer), donate_argnums=(0, 1))
    progress = Progress(config.steps, config.batch_size * config.seq_len, args.log_every)
    data = batches(tokens, config.batch_size, config.seq_len)
    for step in range(1, config.steps + 1):
        params, opt_state, loss = train_step(params, opt_state, next(data))
        progress(step, loss)
    print(f"training: {progress.tokens_per_second(config.steps):,.0f} tokens/s after the first "
          "step")

    if args.generate:
        nnx.update(model, params)
        sample(model, tokenizer, dtype, args, config)


if __name__ == "__main__":
    main()
