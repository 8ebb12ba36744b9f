"""The batched engine against the simple one: same tokens, concurrent sequences, cancellation, no cache leaks."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import llama_cpp
import pytest

from llamakit.catalog import DEFAULT_MODEL, resolve_model
from llamakit.node.batched import BatchedModel
from llamakit.node.engine import GenerationJob, GenerationResult, LoadedModel, SimpleModel
from llamakit.node.placement import LlamaOptions

pytestmark = pytest.mark.model

PROMPTS = [
    "Count from one to one thousand: 1, 2, 3, 4, 5, 6, 7,",
    "The capital of France is",
    "Once upon a time, in a small village by the sea,",
    "def fibonacci(n):",
]


@pytest.fixture(scope="module")
def simple() -> Iterator[SimpleModel]:
    model = SimpleModel(resolve_model(DEFAULT_MODEL), slots=1, n_ctx=512, threads=2)
    yield model
    model.close()


@pytest.fixture(scope="module")
def batched() -> Iterator[BatchedModel]:
    model = BatchedModel(resolve_model(DEFAULT_MODEL), slots=8, n_ctx=512, threads=2)
    yield model
    model.close()


def run(model: LoadedModel, slot: int, job: GenerationJob, cancel: threading.Event | None = None) -> GenerationResult:
    pieces: list[str] = []
    result = model.generate(slot, job, lambda text, _n: pieces.append(text), cancel or threading.Event())
    assert "".join(pieces) == result.text, "the streamed pieces make up the text"
    return result


def job(model: LoadedModel, prompt: str, **kwargs: object) -> GenerationJob:
    return GenerationJob(prompt_tokens=model.tokenize_text(prompt), **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize("prompt", PROMPTS)
def test_same_tokens_as_the_simple_engine_at_temperature_zero(
    simple: SimpleModel, batched: BatchedModel, prompt: str
) -> None:
    a = run(simple, 0, job(simple, prompt, max_tokens=40, temperature=0.0))
    b = run(batched, 3, job(batched, prompt, max_tokens=40, temperature=0.0))
    assert (b.text, b.finish_reason, b.prompt_tokens, b.completion_tokens) == (
        a.text,
        a.finish_reason,
        a.prompt_tokens,
        a.completion_tokens,
    )


def test_greedy_argmax_picks_what_llama_cpps_greedy_sampler_picks(batched: BatchedModel) -> None:
    """Temperature 0 alone is sampled as the argmax of the logits in place; a logit bias of 0 changes no logit
    but puts llama.cpp's own sampler chain (bias, then greedy) on the same sequence: the tokens must agree."""
    for prompt in PROMPTS:
        fast = run(batched, 5, job(batched, prompt, max_tokens=40, temperature=0.0))
        chain = run(batched, 6, job(batched, prompt, max_tokens=40, temperature=0.0, logit_bias={13: 0.0}))
        assert (fast.text, fast.completion_tokens) == (chain.text, chain.completion_tokens)


def test_same_tokens_as_the_simple_engine_with_flash_attention_off() -> None:
    """Both engines follow the node's --flash-attn (the fixtures above run its default, auto: on on every CPU), and
    agree at temperature 0 with it off too: the same kernels, in the same batch shape."""
    options = LlamaOptions(flash_attn="off")
    simple = SimpleModel(resolve_model(DEFAULT_MODEL), slots=1, n_ctx=512, threads=2, options=options)
    batched = BatchedModel(resolve_model(DEFAULT_MODEL), slots=2, n_ctx=512, threads=2, options=options)
    try:
        assert simple.placement is not None and batched.placement is not None
        assert simple.placement.flash_attn == batched.placement.flash_attn == "off"
        a = run(simple, 0, job(simple, PROMPTS[2], max_tokens=40, temperature=0.0))
        b = run(batched, 1, job(batched, PROMPTS[2], max_tokens=40, temperature=0.0))
        assert (b.text, b.completion_tokens) == (a.text, a.completion_tokens)
    finally:
        simple.close()
        batched.close()


def test_same_tokens_as_the_simple_engine_for_the_same_seed(simple: SimpleModel, batched: BatchedModel) -> None:
    prompt = "My favourite breakfast is"
    a = run(simple, 0, job(simple, prompt, max_tokens=30, temperature=0.9, seed=1234))
    b = run(batched, 0, job(batched, prompt, max_tokens=30, temperature=0.9, seed=1234))
    assert b.text == a.text
    c = run(batched, 0, job(batched, prompt, max_tokens=30, temperature=0.9, seed=99))
    assert c.text != a.text


def test_concurrent_sequences_each_get_their_own_answer(batched: BatchedModel) -> None:
    """Eight sequences decoded together each continue their own prompt. Their texts are not compared with the
    same prompts decoded alone: llama.cpp gives other floats for another batch shape, and at a near-tie another
    token (seen on AMD EPYC after ~50 tokens of a story). So the prompts are ones whose next tokens win by far
    on any CPU (number series), and the rest is checked by what a grammar or a limit guarantees."""
    series = {  # prompt: what every x86-64 CPU continues it with
        PROMPTS[0]: " 8, 9, 10, 11,",
        "10, 20, 30, 40, 50,": " 60, 70",
        "2, 4, 6, 8, 10, 12,": " 14, 16, 18, 20,",
        "100, 99, 98, 97, 96,": " 95, 94, 93, 92,",
    }
    prompts = list(series)
    jobs = [
        job(batched, prompts[0], max_tokens=50, temperature=0.0, stop=[" 12,"]),
        job(batched, "Rate 'great food' from 1 to 5:", max_tokens=5, temperature=0.0, grammar="root ::= [1-5]"),
        job(batched, prompts[1], max_tokens=7, temperature=0.0),
        job(batched, prompts[2], max_tokens=64, temperature=0.0),
        job(batched, prompts[3], max_tokens=33, temperature=0.0),
        job(batched, "yes or no?", max_tokens=5, temperature=0.0, grammar='root ::= "yes" | "no"'),
        job(batched, "word " * 300, max_tokens=10, temperature=0.0),  # a long prompt, fed in chunks
        job(batched, prompts[0], max_tokens=20, temperature=0.0),
    ]
    with ThreadPoolExecutor(max_workers=8) as pool:
        together = list(pool.map(lambda ij: run(batched, ij[0], ij[1]), enumerate(jobs)))
    for i, result in enumerate(together):
        assert result.prompt_tokens == len(jobs[i].prompt_tokens), i
        assert 0 < result.completion_tokens <= jobs[i].max_tokens, i
    assert together[0].finish_reason == "stop" and together[0].text == series[prompts[0]], together[0]
    assert together[1].text in {"1", "2", "3", "4", "5"}
    assert together[2].completion_tokens == 7 and together[2].finish_reason == "length"
    assert together[2].text.startswith(series[prompts[1]]), together[2]
    assert together[3].completion_tokens == 64 and together[3].text.startswith(series[prompts[2]]), together[3]
    assert together[4].completion_tokens == 33 and together[4].text.startswith(series[prompts[3]]), together[4]
    assert together[5].text in {"yes", "no"}
    assert together[7].completion_tokens == 20 and together[7].text.startswith(series[prompts[0]]), together[7]


def test_a_cancelled_sequence_frees_its_slot_and_the_others_continue(batched: BatchedModel) -> None:
    long_job = job(batched, PROMPTS[0], max_tokens=400, temperature=0.0)
    cancel = threading.Event()
    seen: list[int] = []

    def on_text(_text: str, n: int) -> None:
        seen.append(n)
        if n >= 5:
            cancel.set()

    with ThreadPoolExecutor(max_workers=2) as pool:
        cancelled = pool.submit(batched.generate, 0, long_job, on_text, cancel)
        other = pool.submit(run, batched, 1, job(batched, PROMPTS[2], max_tokens=60, temperature=0.0))
        result = cancelled.result()
        finished = other.result()
    assert result.finish_reason == "cancelled"
    assert 5 <= result.completion_tokens <= 8, "stopped within a few tokens"
    assert finished.completion_tokens == 60 and finished.finish_reason == "length"
    memory = llama_cpp.llama_get_memory(batched._ctx)
    assert llama_cpp.llama_memory_seq_pos_max(memory, 0) == -1, "the cancelled sequence's cells were freed"


def test_no_cache_cells_leak_over_hundreds_of_requests(batched: BatchedModel) -> None:
    def one(i: int) -> GenerationResult:
        cancel = threading.Event()
        if i % 7 == 0:
            cancel.set()
        return run(batched, i % 8, job(batched, f"Item {i}:", max_tokens=1 + i % 4, temperature=0.5, seed=i), cancel)

    with ThreadPoolExecutor(max_workers=8) as pool:
        # Slot i % 8 is used by one request at a time, as the node's ModelHost guarantees: run in waves of 8.
        results = []
        for wave in range(30):
            results += list(pool.map(one, range(wave * 8, wave * 8 + 8)))
    assert len(results) == 240
    assert sum(r.finish_reason == "cancelled" for r in results) == len([i for i in range(240) if i % 7 == 0])
    memory = llama_cpp.llama_get_memory(batched._ctx)
    for slot, i in enumerate(range(232, 240)):  # the last wave: what each slot keeps is its own last request
        last = results[i]
        kept = 0 if i % 7 == 0 else len(batched.tokenize_text(f"Item {i}:")) + last.completion_tokens - 1
        if last.finish_reason == "stop":
            kept += 1  # the end-of-generation token was decoded before the next one was sampled
        assert llama_cpp.llama_memory_seq_pos_max(memory, slot) == kept - 1, slot
        assert batched.kept_tokens(slot) == kept, slot
    # Every slot still takes a request that fills its whole context.
    for slot in range(8):
        full = job(batched, PROMPTS[0], max_tokens=512 - len(batched.tokenize_text(PROMPTS[0])), temperature=0.0)
        result = run(batched, slot, full)
        assert result.completion_tokens + result.prompt_tokens <= 512


def test_a_slot_reuses_the_prefix_it_keeps_and_answers_as_if_fresh(batched: BatchedModel) -> None:
    system = "You are a careful assistant. Answer briefly and truthfully. " * 8
    first = job(batched, system + "Question: what colour is the sky?", max_tokens=12, temperature=0.0)
    second = job(batched, system + "Question: what do bees make?", max_tokens=12, temperature=0.0)
    unrelated = job(batched, "Unrelated words entirely.", max_tokens=4, temperature=0.0)
    run(batched, 5, unrelated)
    fresh = run(batched, 5, second)  # nothing kept to reuse but the first token
    run(batched, 5, unrelated)
    assert batched.choose_slot([5, 6], first.prompt_tokens) == 5  # nothing shared: the lowest
    run(batched, 6, first)
    assert batched.choose_slot([5, 6], second.prompt_tokens) == 6, "the slot holding the system prompt"
    assert batched.choose_slot([5, 6], [first.prompt_tokens[0], 7]) == 5, "a short shared prefix is not worth a gap"
    reused = run(batched, 6, second)
    assert (reused.text, reused.completion_tokens, reused.prompt_tokens) == (
        fresh.text,
        fresh.completion_tokens,
        fresh.prompt_tokens,
    )
    assert batched.kept_tokens(6) >= len(second.prompt_tokens)


def test_a_long_prompt_is_fed_in_chunks_while_a_stream_keeps_flowing(batched: BatchedModel) -> None:
    events: list[str] = []  # appended on the decode thread, in the order of its steps
    streaming = threading.Event()

    def on_stream(_text: str, n: int) -> None:
        events.append("stream")
        if n >= 2:
            streaming.set()

    long_prompt = job(batched, "Words, words and more words. " * 60, max_tokens=2, temperature=0.0)
    chunks = -(-len(long_prompt.prompt_tokens) // 64)  # the fixture's prefill_chunk is the default, 64
    assert chunks >= 5
    with ThreadPoolExecutor(max_workers=2) as pool:
        stream = pool.submit(
            batched.generate, 2, job(batched, PROMPTS[0], max_tokens=200, temperature=0.0), on_stream, threading.Event()
        )
        assert streaming.wait(60)
        events.append("long arrives")
        long = pool.submit(batched.generate, 3, long_prompt, lambda _t, _n: events.append("long"), threading.Event())
        assert long.result().completion_tokens == 2
        assert stream.result().completion_tokens == 200
    between = events[events.index("long arrives") : events.index("long")]
    assert between.count("stream") >= chunks - 1, "the stream got a token at every step while the prompt was fed"


HISTORY_A = "The history of the city of Rome begins with its founding on seven hills. " * 10
HISTORY_B = "A recipe for bread needs flour, water, salt and yeast, and some patience. " * 10


@pytest.mark.parametrize("cache_ram", [64 << 20, 0, 6 << 20])
def test_a_history_whose_slot_was_taken_comes_back_from_ram(batched: BatchedModel, cache_ram: int) -> None:
    one_slot = BatchedModel(resolve_model(DEFAULT_MODEL), slots=1, n_ctx=512, threads=2, cache_ram=cache_ram)
    try:
        run(one_slot, 0, job(one_slot, HISTORY_A, max_tokens=8, temperature=0.0))
        run(one_slot, 0, job(one_slot, HISTORY_B, max_tokens=8, temperature=0.0))  # takes the only slot
        run(one_slot, 0, job(one_slot, "Unrelated and short.", max_tokens=2, temperature=0.0))
        follow_up = job(one_slot, HISTORY_A + " Its first king was", max_tokens=12, temperature=0.0)
        again = run(one_slot, 0, follow_up)
        # The reference: the same prompt on a slot of the shared engine that holds nothing of it.
        run(batched, 7, job(batched, "Nothing in common.", max_tokens=2, temperature=0.0))
        fresh = run(batched, 7, job(batched, HISTORY_A + " Its first king was", max_tokens=12, temperature=0.0))
        assert (again.text, again.completion_tokens) == (fresh.text, fresh.completion_tokens)
        history = len(one_slot.tokenize_text(HISTORY_A))
        if cache_ram == 64 << 20:
            assert again.cached_tokens >= history, "the history came back from RAM"
            assert len(one_slot.ram) == 2 and one_slot.ram.used_bytes <= cache_ram
        elif cache_ram == 0:
            assert again.cached_tokens <= 1 and len(one_slot.ram) == 0
        else:  # room for one saved history: B's pushed A's out
            assert again.cached_tokens <= 1 and len(one_slot.ram) == 1
    finally:
        one_slot.close()


@pytest.mark.parametrize("engine", ["simple", "batched"])
def test_a_slot_reuses_the_cells_of_its_own_cache_salt_only(
    simple: SimpleModel, batched: BatchedModel, engine: str
) -> None:
    # Another tenant's prompt must not be reused: the reuse shows in cached_tokens (and in how fast the prompt
    # is read), which would tell a client how its prompt's start matches theirs, token by token.
    model: LoadedModel = simple if engine == "simple" else batched
    slot = 0 if engine == "simple" else 5
    secret = HISTORY_A + " The admin PIN is 7199."
    run(model, slot, job(model, secret, max_tokens=2, temperature=0.0, cache_salt="account-1"))
    probe = job(model, HISTORY_A + " The admin PIN is 71", max_tokens=1, temperature=0.0, cache_salt="account-2")
    if engine == "batched":
        assert batched.choose_slot([4, 5], probe.prompt_tokens, "account-2") == 4, "no slot is preferred for it"
    assert run(model, slot, probe).cached_tokens == 0
    again = job(model, secret, max_tokens=2, temperature=0.0, cache_salt="account-2")
    assert run(model, slot, again).cached_tokens >= len(model.tokenize_text(HISTORY_A)), "its own cells, reused"


@pytest.mark.parametrize("engine", ["simple", "batched"])
def test_the_prompt_tokens_a_slot_reused_are_told_once_before_the_first_text(
    simple: SimpleModel, batched: BatchedModel, engine: str
) -> None:
    """`on_admitted`: how a node's stream carries its cached tokens from its first token on (wire.node)."""
    model: LoadedModel = simple if engine == "simple" else batched
    slot = 0 if engine == "simple" else 7
    run(model, slot, job(model, HISTORY_A, max_tokens=2, temperature=0.0, cache_salt="told"))
    told: list[tuple[str, int]] = []
    again = job(model, HISTORY_A + " Its first king was", max_tokens=4, temperature=0.0, cache_salt="told")
    result = model.generate(
        slot, again, lambda _text, n: told.append(("text", n)), threading.Event(),
        on_admitted=lambda cached: told.append(("admitted", cached)),
    )  # fmt: skip
    assert result.cached_tokens >= len(model.tokenize_text(HISTORY_A)) - 1
    assert told[0] == ("admitted", result.cached_tokens) and len(told) > 1
    assert [t for t in told if t[0] == "admitted"] == [told[0]]
