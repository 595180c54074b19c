"""Generation: compiled loop vs streaming loop, padding, stopping, chunked prefill, bucketing, HF parity, the CLI."""

import copy
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import REPO
from tiny import sharpen

from glm4_jax import checkpoint
from glm4_jax.engine import Generator, clear_compiled, pad_left, prefill_chunks, truncate_left
from glm4_jax.fixtures import GQA6
from glm4_jax.generate import main
from glm4_jax.model import init_model
from glm4_jax.sampling import SamplingParams

TINY = GQA6.replace(num_layers=2)
SAMPLED = SamplingParams(temperature=0.9, top_k=40, top_p=0.95, repetition_penalty=1.3)


@pytest.fixture(scope="module")
def model():
    return sharpen(init_model(TINY, seed=1))


@pytest.fixture(scope="module")
def gen(model):
    return Generator(model, prefill_chunk=16)


def _prompt(n, seed=0, lo=3, hi=TINY.vocab_size):
    return np.random.RandomState(seed).randint(lo, hi, n).tolist()


# ---- planning ------------------------------------------------------------------------------------------------------


def test_prefill_chunks_buckets_and_chunks():
    assert prefill_chunks(5, 512) == [16]
    assert prefill_chunks(17, 512) == [32]
    assert prefill_chunks(300, 512) == [512]
    assert prefill_chunks(300, 384) == [384]  # bucket capped at the chunk
    assert prefill_chunks(1030, 512) == [16, 512, 512]
    assert prefill_chunks(1024, 512) == [512, 512]
    assert prefill_chunks(37, 16) == [16, 16, 16]
    assert prefill_chunks(37, 16, bucket=False) == [5, 16, 16]
    assert prefill_chunks(5, 512, limit=10) == [10]  # the bucket never passes the cache length


def test_pad_left_positions():
    tokens, positions = pad_left([[5, 6, 7], [9]], 5, pad_id=0)
    np.testing.assert_array_equal(tokens, [[0, 0, 5, 6, 7], [0, 0, 0, 0, 9]])
    np.testing.assert_array_equal(positions, [[-2, -1, 0, 1, 2], [-4, -3, -2, -1, 0]])


def test_truncate_left_keeps_prefix():
    assert truncate_left([1, 2, 3, 4, 5, 6], 4, prefix=[1, 2]) == [1, 2, 5, 6]
    assert truncate_left([9, 2, 3, 4, 5, 6], 4, prefix=[1, 2]) == [3, 4, 5, 6]
    assert truncate_left([1, 2, 3], 4, prefix=[1, 2]) == [1, 2, 3]


# ---- the compiled loop and the streaming loop ---------------------------------------------------------------------


@pytest.mark.parametrize("sampling", [SamplingParams(), SAMPLED], ids=["greedy", "sampled"])
def test_compiled_loop_equals_streaming_loop(gen, sampling):
    prompts = [_prompt(11, 0), _prompt(29, 1)]
    kw = dict(max_new_tokens=12, sampling=sampling, seed=5, stop_ids=())
    compiled = gen.generate(prompts, **kw)
    steps = []
    streamed = gen.generate_streaming(prompts, steps.append, **kw)
    assert compiled.ids == streamed.ids
    assert [len(i) for i in compiled.ids] == [12, 12]
    assert np.stack(steps, axis=1).tolist() == compiled.ids
    assert not compiled.streamed and streamed.streamed
    assert compiled.stop_reasons == streamed.stop_reasons == ["max_new_tokens"] * 2


def test_left_padded_batch_equals_each_sequence_alone(gen):
    prompts = [_prompt(n, seed=i) for i, n in enumerate([37, 5, 20])]
    batch = gen.generate(prompts, max_new_tokens=12, stop_ids=())
    for p, ids in zip(prompts, batch.ids, strict=True):
        alone = gen.generate([p], max_new_tokens=12, stop_ids=())
        assert alone.ids[0] == ids


def test_greedy_is_deterministic_and_seed_matters_only_when_sampling(gen):
    p = [_prompt(9, 3)]
    a = gen.generate(p, max_new_tokens=12, sampling=SAMPLED, seed=1, stop_ids=())
    b = gen.generate(p, max_new_tokens=12, sampling=SAMPLED, seed=1, stop_ids=())
    c = gen.generate(p, max_new_tokens=12, sampling=SAMPLED, seed=2, stop_ids=())
    assert a.ids == b.ids
    assert a.ids != c.ids
    g1 = gen.generate(p, max_new_tokens=12, seed=1, stop_ids=())
    g2 = gen.generate(p, max_new_tokens=12, seed=2, stop_ids=())
    assert g1.ids == g2.ids


# ---- stopping ------------------------------------------------------------------------------------------------------


def test_stop_id_ends_a_row_and_others_continue(gen):
    prompts = [_prompt(8, 0), _prompt(14, 1)]
    free = gen.generate(prompts, max_new_tokens=12, stop_ids=())
    row0 = free.ids[0]
    k = 5
    stop = row0[k]
    first = row0.index(stop)  # the first occurrence is where it stops
    assert stop not in free.ids[1]
    for run in (gen.generate, gen.generate_streaming):
        res = run(prompts, max_new_tokens=12, stop_ids=(stop,))
        assert res.ids[0] == row0[: first + 1]  # the stop id is included
        assert res.stop_reasons[0] == "stop_id"
        assert res.ids[1] == free.ids[1]
        assert res.stop_reasons[1] == "max_new_tokens"


def test_all_rows_stopped_ends_the_loop_early(gen):
    p = [_prompt(8, 0)]
    free = gen.generate(p, max_new_tokens=12, stop_ids=())
    stop = free.ids[0][3]
    res = gen.generate(p, max_new_tokens=12, stop_ids=(stop,))
    assert res.steps == free.ids[0].index(stop) + 1
    assert res.ids[0][-1] == stop


def test_default_stop_ids_are_the_config_eos_ids(gen):
    assert gen.settings(SamplingParams(), 4, None).stop_ids == TINY.eos_token_ids


def test_max_new_tokens(gen):
    res = gen.generate([_prompt(6)], max_new_tokens=12, stop_ids=())
    assert len(res.ids[0]) == 12 and res.steps == 12
    assert res.stop_reasons == ["max_new_tokens"]
    one = gen.generate([_prompt(6)], max_new_tokens=1, stop_ids=())
    assert one.ids[0] == res.ids[0][:1]


def test_cache_full_stops(gen):
    p = [_prompt(10)]
    free = gen.generate(p, max_new_tokens=12, stop_ids=())
    for run in (gen.generate, gen.generate_streaming):
        res = run(p, max_new_tokens=12, stop_ids=(), max_len=14)
        assert res.padded_length == 10  # near the limit the prompt is not padded to its bucket (16)
        assert res.max_len == 14
        assert res.ids[0] == free.ids[0][:5]  # 4 fed back into the free slots, plus one chosen from the last
        assert res.stop_reasons == ["cache_full"]


def test_prompt_too_long_for_cache(gen):
    from glm4_jax.engine import GenerationError, PromptTooLongError

    with pytest.raises(PromptTooLongError, match="20 tokens"):
        gen.generate([_prompt(20)], max_len=10)
    with pytest.raises(PromptTooLongError, match="context"):
        gen.generate([_prompt(TINY.max_seq_len + 1)])
    with pytest.raises(GenerationError, match="empty"):
        gen.generate([[]])
    with pytest.raises(GenerationError, match="outside"):
        gen.generate([[TINY.vocab_size]])


# ---- chunked prefill and bucketing --------------------------------------------------------------------------------


def test_chunked_prefill_equals_one_shot(model):
    prompts = [_prompt(45, 0), _prompt(30, 1)]
    kw = dict(max_new_tokens=12, stop_ids=())
    one_shot = Generator(model, prefill_chunk=512).generate(prompts, **kw)
    for chunk in (8, 16, 7):
        chunked = Generator(model, prefill_chunk=chunk).generate(prompts, **kw)
        assert chunked.ids == one_shot.ids, chunk


def test_chunked_prefill_logits_equal_one_shot(model):
    import jax

    from glm4_jax.engine import _prefill_chunk
    from glm4_jax.model import KVCache

    p = _prompt(40, 2)
    tokens, positions = pad_left([p], 48, 0)
    gen = Generator(model)
    graphdef, state = gen.graphdef, gen.state

    def run(sizes):
        cache, start = KVCache.init(TINY, 1, 64), 0
        for n in sizes:
            logits, cache = _prefill_chunk(
                graphdef, state, cache, tokens[:, start : start + n], positions[:, start : start + n]
            )
            start += n
        return np.asarray(jax.device_get(logits))

    np.testing.assert_allclose(run([16, 16, 16]), run([48]), atol=1e-5, rtol=1e-5)


def test_bucketing_does_not_change_results_or_recompile(model):
    clear_compiled()  # count this test's compilations only
    bucketed, exact = Generator(model, prefill_chunk=64), Generator(model, prefill_chunk=64, bucket=False)
    for n in (17, 23, 30):  # one bucket (32)
        p = [_prompt(n, n)]
        assert (
            bucketed.generate(p, max_new_tokens=6, stop_ids=()).ids
            == exact.generate(p, max_new_tokens=6, stop_ids=()).ids
        )
    assert bucketed.compiled_count("prefill") == 1
    assert bucketed.compiled_count("loop") == 1
    assert exact.compiled_count("prefill") == 3


# ---- vocabulary padding --------------------------------------------------------------------------------------------


def test_padded_vocab_rows_never_generated():
    model = init_model(TINY, seed=2)
    model.lm_head[...] = model.lm_head[...].at[:, 100:].add(1.0)  # the padded rows would win everywhere
    free = Generator(model).generate([_prompt(5)], max_new_tokens=8, stop_ids=(), sampling=SAMPLED)
    assert max(free.ids[0]) >= 100  # sanity: without the mask they are chosen
    gen = Generator(model, n_vocab=100)
    for sampling in (SamplingParams(), SamplingParams(temperature=5.0)):
        res = gen.generate([_prompt(5), _prompt(9, 1)], max_new_tokens=16, stop_ids=(), sampling=sampling)
        assert max(max(ids) for ids in res.ids) < 100


# ---- parity with transformers -------------------------------------------------------------------------------------


def test_greedy_equals_transformers_generate(tmp_path):
    torch = pytest.importorskip("torch")
    helpers_hf = pytest.importorskip("helpers_hf")
    from glm4_jax.convert.__main__ import main as convert_main

    hf_model = helpers_hf.tiny_hf_model(seed=0)
    src = helpers_hf.save_hf(hf_model, tmp_path / "hf")
    dst = tmp_path / "converted"
    convert_main([str(src), str(dst), "--dtype", "float32", "-q"])
    model = checkpoint.load(dst)
    assert model.cfg.dtype == "float32"
    gen = Generator(model, prefill_chunk=64)  # the 150-token prompt goes in as 32 + 64 + 64 (with padding)

    gen_cfg = copy.deepcopy(hf_model.generation_config)
    gen_cfg.eos_token_id = None  # compare all 32 tokens
    for n in (13, 150):
        prompt = np.random.RandomState(n).randint(3, model.cfg.vocab_size, n).tolist()
        ours = gen.generate([prompt], max_new_tokens=32, stop_ids=())
        with torch.no_grad():
            out = hf_model.generate(
                torch.tensor([prompt]),
                attention_mask=torch.ones(1, n, dtype=torch.long),
                generation_config=gen_cfg,
                max_new_tokens=32,
                do_sample=False,
                pad_token_id=hf_model.config.pad_token_id,
            )
        theirs = out[0, n:].tolist()
        assert len(theirs) == 32
        assert ours.ids[0] == theirs


# ---- the CLI -------------------------------------------------------------------------------------------------------

SMALL_CTX = TINY.replace(vocab_size=384, max_seq_len=64, eos_token_ids=(256, 263, 265), pad_token_id=256)


@pytest.fixture(scope="module")
def ckpt_dirs(tmp_path_factory):
    """Two checkpoints of a tiny model with a 64-token context: without and with a (synthetic) tokenizer."""
    from glm4_jax.fixtures import write_synthetic_tokenizer

    base = tmp_path_factory.mktemp("cli")
    model = sharpen(init_model(SMALL_CTX, seed=3))
    plain, with_tok = base / "plain", base / "with_tok"
    checkpoint.save(plain, model, SMALL_CTX)
    checkpoint.save(with_tok, model, SMALL_CTX)
    write_synthetic_tokenizer(with_tok / "tokenizer.model", n_merges=0)  # 256 bytes + specials at 256..269
    return plain, with_tok


def _cli_error(capsys, argv) -> str:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    out, err = capsys.readouterr()
    assert out == ""
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    return lines[0]


def test_cli_bad_numbers(capsys, ckpt_dirs):
    _, ck = ckpt_dirs
    base = ["--ckpt", str(ck), "--prompt", "hi"]
    assert "--temperature" in _cli_error(capsys, [*base, "--temperature", "-0.5"])
    assert "--top-p" in _cli_error(capsys, [*base, "--top-p", "0"])
    assert "--top-p" in _cli_error(capsys, [*base, "--top-p", "1.5"])
    assert "--top-k" in _cli_error(capsys, [*base, "--top-k", "-1"])
    assert f"--top-k must be in [0, {2**31 - 1}]" in _cli_error(capsys, [*base, "--top-k", str(10**30)])
    assert "--max-new-tokens" in _cli_error(capsys, [*base, "--max-new-tokens", "0"])
    assert "--repetition-penalty" in _cli_error(capsys, [*base, "--repetition-penalty", "0"])
    assert "invalid float" in _cli_error(capsys, [*base, "--temperature", "hot"])


def test_cli_bad_prompts(capsys, ckpt_dirs):
    plain, ck = ckpt_dirs
    assert "empty prompt" in _cli_error(capsys, ["--ckpt", str(ck), "--prompt", ""])
    assert "empty prompt" in _cli_error(capsys, ["--ckpt", str(ck), "--chat", "  "])
    assert "empty prompt" in _cli_error(capsys, ["--ckpt", str(ck), "--prompt-ids", ""])
    assert "integers" in _cli_error(capsys, ["--ckpt", str(ck), "--prompt-ids", "1,x"])
    assert "not allowed with" in _cli_error(capsys, ["--ckpt", str(ck), "--prompt", "a", "--chat", "b"])
    assert "outside the vocabulary" in _cli_error(capsys, ["--ckpt", str(ck), "--prompt-ids", "1,999"])
    msg = _cli_error(capsys, ["--ckpt", str(plain), "--prompt", "hello"])
    assert "tokenizer" in msg and "--prompt-ids" in msg
    assert "tokenizer" in _cli_error(capsys, ["--ckpt", str(plain), "--chat", "hello"])


def test_cli_prompt_too_long_offers_truncation(capsys, ckpt_dirs):
    _, ck = ckpt_dirs
    long_text = "x" * 100  # 100 byte tokens + [gMASK]<sop> > the 64-token context
    msg = _cli_error(capsys, ["--ckpt", str(ck), "--prompt", long_text])
    assert "102 tokens" in msg and "64 tokens" in msg and "--truncate-left" in msg
    assert "--max-len" in _cli_error(capsys, ["--ckpt", str(ck), "--prompt", "x" * 30, "--max-len", "20"])
    assert "exceeds the model's context" in _cli_error(capsys, ["--ckpt", str(ck), "--prompt", "x", "--max-len", "65"])
    assert main(["--ckpt", str(ck), "--prompt", long_text, "--truncate-left", "--max-new-tokens", "4", "--json"]) == 0
    record = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert record["prompt_tokens"] == 64 - 4
    assert len(record["ids"]) == 4 or record["stop_reason"] == "stop_id"


def test_cli_bad_checkpoint(capsys, tmp_path):
    assert "no such directory" in _cli_error(capsys, ["--ckpt", str(tmp_path / "nope"), "--prompt-ids", "1"])
    (tmp_path / "junk").mkdir()
    assert "not a glm4-jax checkpoint" in _cli_error(capsys, ["--ckpt", str(tmp_path / "junk"), "--prompt-ids", "1"])
    assert "--ckpt" in _cli_error(capsys, ["--prompt", "hi"])  # required


def test_cli_prompt_ids_json_matches_api_with_and_without_mesh(capsys, ckpt_dirs):
    plain, _ = ckpt_dirs
    argv = ["--ckpt", str(plain), "--prompt-ids", "5,6,7,8", "--max-new-tokens", "6", "--json"]
    assert main(argv) == 0
    out = capsys.readouterr().out.splitlines()
    record = json.loads(out[-1])
    want = Generator(checkpoint.load(plain)).generate([[5, 6, 7, 8]], max_new_tokens=6)
    assert record["ids"] == want.ids[0]
    assert record["stop_reason"] == want.stop_reasons[0]
    assert record["prompt_tokens"] == 4 and record["mode"] == "stream"
    assert out[0].split() == [str(i) for i in want.ids[0]]  # the ids streamed as they came
    assert main([*argv, "--no-stream"]) == 0
    record = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert record["ids"] == want.ids[0] and record["mode"] == "compiled"
    assert main([*argv, "--no-stream", "--mesh", "data=1,fsdp=1,tensor=2,sequence=4"]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["ids"] == want.ids[0]
    assert "--mesh" in _cli_error(capsys, [*argv, "--mesh", "tensor=3"])


def test_cli_chat_uses_template_and_chat_defaults(capsys, ckpt_dirs):
    from glm4_jax.tokenizer import Tokenizer

    _, ck = ckpt_dirs
    tok = Tokenizer.from_file(ck / "tokenizer.model")
    assert main(["--ckpt", str(ck), "--chat", "Hi", "--system", "Be brief.", "--max-new-tokens", "5", "--json"]) == 0
    record = json.loads(capsys.readouterr().out.splitlines()[-1])
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert record["prompt_tokens"] == len(tok.apply_chat_template(msgs))
    assert record["sampling"]["temperature"] == 0.8 and record["sampling"]["top_p"] == 0.8
    stops = set(tok.stop_ids)
    assert record["text"] == tok.decode([t for t in record["ids"] if t not in stops]).removeprefix("\n")


def test_cli_help_mentions_defaults(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for needle in ("temperature 0.8", "top-p 0.8", "--truncate-left", "--prompt-ids", "--mesh", "default"):
        assert needle in text


def _run(args, **kw):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)
    return subprocess.run(
        [sys.executable, "-m", "glm4_jax.generate", *args], capture_output=True, text=True, env=env, cwd=REPO, **kw
    )


def test_cli_json_subprocess_on_converted_checkpoint(tmp_path):
    from glm4_jax.api import GLM4Chat
    from glm4_jax.fixtures import build_demo_checkpoint

    dst = build_demo_checkpoint(tmp_path / "demo")  # THUDM layout -> the real converter
    proc = _run(["--ckpt", str(dst), "--chat", "Hello there", "--temperature", "0", "--max-new-tokens", "10", "--json"])
    assert proc.returncode == 0, proc.stderr
    record = json.loads(proc.stdout.splitlines()[-1])
    for key in ("ids", "text", "prompt_tokens", "stop_reason", "prefill_s", "decode_tok_s"):
        assert key in record
    chat = GLM4Chat.from_checkpoint(dst)
    ids = chat.encode_chat("Hello there")
    assert record["prompt_tokens"] == len(ids)
    want = chat.generator.generate([ids], max_new_tokens=10, stop_ids=chat.chat_stop_ids())
    assert record["ids"] == want.ids[0]
    assert record["stop_reason"] == want.stop_reasons[0]
    # The streamed text precedes the JSON line.
    assert record["text"] in proc.stdout.rsplit("\n", 2)[0]


def test_cli_error_subprocess_has_no_traceback(tmp_path):
    proc = _run(["--ckpt", str(tmp_path), "--prompt-ids", "1", "--top-p", "2"])
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: --top-p")


def test_cli_interactive_chat(capsys, monkeypatch, ckpt_dirs):
    _, ck = ckpt_dirs
    lines = iter(["Hi", "", "/reset", "Hello", "/exit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    monkeypatch.setattr(sys.stdin, "isatty", lambda: True, raising=False)
    assert main(["--ckpt", str(ck), "--max-new-tokens", "3", "--temperature", "0"]) == 0
    out = capsys.readouterr().out
    assert "/reset clears the history" in out
    assert out.count("assistant> ") == 2
    assert "(history cleared)" in out
    monkeypatch.setattr(sys.stdin, "isatty", lambda: False, raising=False)
    assert "needs a terminal" in _cli_error(capsys, ["--ckpt", str(ck)])


# ---- the Python API ------------------------------------------------------------------------------------------------


def test_api_chat_generate_stream(ckpt_dirs):
    from glm4_jax.api import GLM4Chat

    _, ck = ckpt_dirs
    chat = GLM4Chat.from_checkpoint(ck)
    tok = chat.tokenizer
    assert chat.generator.n_vocab == tok.n_vocab == 270

    pieces = list(chat.chat("Hi", stream=True, max_new_tokens=8, seed=3))
    res = chat.last_result
    assert res.streamed and all(isinstance(p, str) for p in pieces)
    stops = set(chat.chat_stop_ids())
    body = [t for t in res.ids[0] if t not in stops]
    assert "".join(pieces) == tok.decode(body).removeprefix("\n")
    whole = chat.chat("Hi", max_new_tokens=8, seed=3)  # the compiled loop: the same tokens
    assert chat.last_result.ids == res.ids
    assert whole == "".join(pieces)

    batch = chat.generate(["ab", "hello world"], max_new_tokens=6)
    assert len(batch.texts) == 2 and batch.prompt_tokens == [len(tok.encode_prompt(t)) for t in ("ab", "hello world")]
    streamed = "".join(chat.stream("hello world", max_new_tokens=6))
    assert streamed == batch.texts[1] and chat.last_result.ids[0] == batch.ids[1]


# ---- the user's path: fast argument errors, status lines, signals, pipes --------------------------------------------


@pytest.mark.parametrize(
    "module, argv",
    [
        ("glm4_jax.generate", ["--help"]),
        ("glm4_jax.generate", ["--ckpt", "x", "--prompt", "hi", "--top-p", "2"]),
        ("glm4_jax.generate", ["--ckpt", "x", "--prompt", "hi", "--seed", str(2**70)]),
        ("glm4_jax.generate", ["--ckpt", "x", "--prompt", "hi", "--mesh", "tensor=x"]),
        ("glm4_jax.generate", ["--ckpt", "x", "--prompt", "hi", "--coordinator", "h:1"]),
        ("glm4_jax.convert.__main__", ["--help"]),
        ("glm4_jax.convert.__main__", ["only-one"]),
        ("glm4_jax.bench", ["--help"]),
        ("glm4_jax.bench", ["--random", "tiny", "--new-tokens", "1"]),
        ("glm4_jax.sharding.plan", ["--help"]),
        ("glm4_jax.sharding.plan", ["--mesh", "tensor=x"]),
    ],
)
def test_cli_checks_arguments_before_importing_jax(module, argv):
    """--help and a bad argument answer without importing JAX (so in a fraction of a second)."""
    code = (
        f"import sys\nfrom {module} import main\n"
        f"try:\n    rc = main({argv!r})\nexcept SystemExit as e:\n    rc = e.code\n"
        "print('RC', rc, 'JAX', 'jax' in sys.modules)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=60)
    last = proc.stdout.strip().splitlines()[-1]
    want_rc = "0" if argv == ["--help"] else "2"
    assert last == f"RC {want_rc} JAX False", (last, proc.stderr)
    if want_rc == "2":
        assert proc.stderr.startswith("error: ") or "error:" in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr


def test_cli_status_lines_on_stderr_quiet_and_json(ckpt_dirs):
    _, ck = ckpt_dirs
    proc = _run(["--ckpt", str(ck), "--chat", "Hi", "--max-new-tokens", "3"])
    assert proc.returncode == 0, proc.stderr
    lines = proc.stderr.splitlines()
    assert lines[0].startswith("loading ") and "MB of float32 weights" in lines[0] and str(ck) in lines[0]
    assert any(line.startswith("prefilling ") and "tokens" in line for line in lines)
    assert any(line.startswith("compiling the prefill") for line in lines)
    assert any(line == "compiling the decode step" for line in lines)
    assert "loading" not in proc.stdout and "compiling" not in proc.stdout
    quiet = _run(["--ckpt", str(ck), "--chat", "Hi", "--max-new-tokens", "3", "-q", "--json"])
    assert quiet.returncode == 0 and quiet.stderr == "", quiet.stderr
    record = json.loads(quiet.stdout.splitlines()[-1])  # stdout: the text, then the JSON line
    assert record["new_tokens"] <= 3


def test_cli_truncate_left_refuses_a_chat(ckpt_dirs, capsys):
    """A chat prompt longer than --max-len is refused with one line (cutting it would drop the role tokens), with or
    without --truncate-left; a plain --prompt of the same length is still cut."""
    _, ck = ckpt_dirs
    long = " ".join(["hello"] * 80)
    for extra in ([], ["--truncate-left"]):
        with pytest.raises(SystemExit) as exc:
            main(["--ckpt", str(ck), "--chat", long, "--max-len", "32", "--max-new-tokens", "4", *extra])
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("error: the chat prompt is "), err
        assert "longer than --max-len (32 tokens)" in err and "role tokens" in err, err
    args = ["--ckpt", str(ck), "--prompt", long, "--max-len", "32", "--max-new-tokens", "4", "--truncate-left", "-q"]
    assert main([*args, "--json"]) == 0
    record = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert record["prompt_tokens"] == 28


_AS_MAIN = """
import runpy, sys
import glm4_jax.engine as engine

mode = sys.argv.pop(1)

def fail(self, *a, **k):
    if mode == "usage":  # code that imports the CLI module by name, as a library would, and raises its error
        from glm4_jax.generate import UsageError

        raise UsageError("injected failure")
    raise engine.GenerationError("injected failure")

engine.Generator.generate = fail
runpy.run_module(sys.argv.pop(1), run_name="__main__", alter_sys=True)
"""


@pytest.mark.parametrize("raised", ["generation", "usage"])
def test_cli_as_main_module_imports_itself_once(ckpt_dirs, raised):
    """Run as `python -m` (runpy's __main__), a GenerationError from the engine is caught by the CLI's own handler:
    one `error:` line and status 2, no traceback; code that imports `glm4_jax.generate` then gets the running module,
    not a second copy whose exception classes the handler would not catch."""
    plain, _ = ckpt_dirs
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)
    args = ["glm4_jax.generate", "--ckpt", str(plain), "--prompt-ids", "5,6,7", "--max-new-tokens", "2"]
    proc = subprocess.run(
        [sys.executable, "-c", _AS_MAIN, raised, *args, "--no-stream", "-q"],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr == "error: injected failure\n", proc.stderr


def test_cli_loading_progress_bar_on_the_demo_checkpoint(demo_ckpt):
    """The demo checkpoint through the CLI: the status lines and the loading bar (tqdm, bytes) go to stderr, never
    to stdout; -q leaves stderr empty and --json stdout a JSON line."""
    proc = _run(["--ckpt", str(demo_ckpt), "--chat", "Hi", "--max-new-tokens", "3", "--json"])
    assert proc.returncode == 0, proc.stderr
    parts = proc.stderr.replace("\r", "\n").splitlines()
    assert parts[0].startswith("loading ") and str(demo_ckpt) in parts[0], parts
    bars = [p for p in parts if p.startswith("loading: ")]
    assert bars and "100%" in bars[-1] and "B/s" in bars[-1], parts
    assert any(p.startswith("compiling the prefill") for p in parts), parts
    assert any(p.startswith("prefilling ") for p in parts), parts
    assert json.loads(proc.stdout.splitlines()[-1])["new_tokens"] <= 3
    assert "loading" not in proc.stdout and "%|" not in proc.stdout
    quiet = _run(["--ckpt", str(demo_ckpt), "--chat", "Hi", "--max-new-tokens", "3", "-q", "--json"])
    assert quiet.returncode == 0 and quiet.stderr == "", quiet.stderr
    assert json.loads(quiet.stdout.splitlines()[-1])["new_tokens"] <= 3


def test_cli_max_new_tokens_capped_by_the_cache_and_huge_seed(capsys, ckpt_dirs):
    plain, _ = ckpt_dirs
    assert main(["--ckpt", str(plain), "--prompt-ids", "5,6,7,8", "--max-new-tokens", str(10**30), "--json"]) == 0
    out, err = capsys.readouterr()
    assert "note: --max-new-tokens 1000000000000000000000000000000 lowered to 61" in err, err
    record = json.loads(out.splitlines()[-1])
    assert record["new_tokens"] <= 61 and record["max_len"] <= SMALL_CTX.max_seq_len
    msg = _cli_error(capsys, ["--ckpt", str(plain), "--prompt-ids", "5", "--seed", str(2**64)])
    assert "--seed" in msg and str(2**64) in msg
    msg = _cli_error(capsys, ["--ckpt", str(plain), "--prompt-ids", "5", "--coordinator", "h:1"])
    assert "--distributed" in msg


def test_cli_temperature_inf_never_samples_padding(capsys, ckpt_dirs):
    _, ck = ckpt_dirs  # 270 token ids, 384 embedding rows
    for t in ("inf", "1e-320"):
        argv = ["--ckpt", str(ck), "--prompt-ids", "5,6,7", "--temperature", t, "--max-new-tokens", "40", "--json"]
        assert main([*argv, "--top-k", "50"]) == 0
        ids = json.loads(capsys.readouterr().out.splitlines()[-1])["ids"]
        assert ids and max(ids) < 270, (t, ids)


def test_cli_interactive_help_and_ctrl_c_keeps_history(capsys, monkeypatch, ckpt_dirs):
    from glm4_jax.api import GLM4Chat
    from glm4_jax.tokenizer import Tokenizer

    _, ck = ckpt_dirs
    seen = []
    real_template = Tokenizer.apply_chat_template

    def record(self, messages, *a, **kw):
        seen.append([dict(m) for m in messages])
        return real_template(self, messages, *a, **kw)

    real_stream = GLM4Chat.stream_text
    calls = []

    def stop_first_reply(self, *a, **kw):
        calls.append(1)
        if len(calls) == 1:  # Ctrl-C in the middle of the first reply
            yield "par"
            raise KeyboardInterrupt
        yield from real_stream(self, *a, **kw)

    monkeypatch.setattr(Tokenizer, "apply_chat_template", record)
    monkeypatch.setattr(GLM4Chat, "stream_text", stop_first_reply)
    lines = iter(["/help", "Hi", "Again", "/exit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    monkeypatch.setattr(sys.stdin, "isatty", lambda: True, raising=False)
    assert main(["--ckpt", str(ck), "--max-new-tokens", "3", "--temperature", "0", "-q"]) == 0
    out = capsys.readouterr().out
    assert "/reset" in out and "Ctrl-C stops the reply" in out  # /help printed the commands ...
    assert all(m["content"] != "/help" for msgs in seen for m in msgs)  # ... and was never sent to the model
    assert "(stopped)" in out
    assert seen[-1] == [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "par"},  # the part written before Ctrl-C stays in the history
        {"role": "user", "content": "Again"},
    ]


@pytest.fixture(scope="module")
def demo_ckpt(tmp_path_factory):
    from glm4_jax.fixtures import build_demo_checkpoint

    return build_demo_checkpoint(tmp_path_factory.mktemp("demo") / "demo")


def _popen(args):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)
    cmd = [sys.executable, "-m", "glm4_jax.generate", *args]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=REPO)


@pytest.mark.slow
@pytest.mark.parametrize("when", ["compiling", "streaming"])
def test_cli_ctrl_c_exits_130_within_a_second(demo_ckpt, when):
    import signal
    import threading
    import time

    proc = _popen(["--ckpt", str(demo_ckpt), "--prompt", "Hi", "--temperature", "1", "--max-new-tokens", "1000"])
    got = {"out": b"", "err": b""}

    def pump(stream, key):
        while chunk := stream.read1(4096):
            got[key] += chunk

    threads = [
        threading.Thread(target=pump, args=(s, k), daemon=True) for s, k in ((proc.stdout, "out"), (proc.stderr, "err"))
    ]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 240
    ready = (lambda: b"compiling" in got["err"]) if when == "compiling" else (lambda: len(got["out"]) > 0)
    while not ready() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, got["err"].decode(errors="replace")  # still running: the signal lands mid-phase
    kept = len(got["out"])
    t0 = time.monotonic()
    proc.send_signal(signal.SIGINT)
    rc = proc.wait(timeout=10)
    elapsed = time.monotonic() - t0
    for t in threads:
        t.join(timeout=5)
    print(f"{when}: exit {rc} {elapsed:.2f} s after SIGINT, {kept} bytes of text before it")
    assert rc == 130 and elapsed < 1.0, (rc, elapsed, got["err"][-500:])
    assert b"Traceback" not in got["err"] and b"Segmentation" not in got["err"]
    assert len(got["out"]) >= kept  # the text printed so far stays
    if when == "streaming":
        assert kept > 0


@pytest.mark.slow
def test_cli_broken_pipe_ends_quietly(demo_ckpt):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)
    cmd = (
        f"'{sys.executable}' -m glm4_jax.generate --ckpt '{demo_ckpt}' --prompt Hi --temperature 1 "
        '--max-new-tokens 300 -q | head -c 10 > /dev/null; echo "status ${PIPESTATUS[0]}"'
    )
    proc = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert proc.stdout.strip() == "status 141", (proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr and "BrokenPipe" not in proc.stderr, proc.stderr


# ---- the CPU layout (glm4_jax.engine.cpu_params) -------------------------------------------------------------------


def test_cpu_layout_same_arithmetic_as_the_models_arrays_and_no_weight_copy_in_the_loop():
    """On one CPU device a Generator runs from its own layout of a bf16 model: the layers held apart, the
    matrices float32 (converted once), the embedding as bit patterns, activations bf16. The caller's model is
    unchanged; the logits are those of the model's own arrays up to bf16 rounding, the ids the same on the loop
    and the streaming paths (greedy and sampled); and neither the compiled loop nor the step holds a copy of the
    weights in temp memory, which the loop on the model's arrays does (XLA hoists a float32 copy)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from glm4_jax.engine import _COMPILED, _prefill_chunk
    from glm4_jax.model import KVCache

    clear_compiled()  # a Generator records only what it compiles itself (temp() below looks its executables up)
    cfg = TINY.replace(dtype="bfloat16", vocab_size=4096)  # the embedding is most of the bytes
    m = sharpen(init_model(cfg, seed=3))  # peaked logits: ids that a bf16 rounding step cannot flip
    before = {k: (v.dtype, v.shape) for k, v in jax.tree_util.tree_leaves_with_path(nnx.state(m))}
    fast, plain = Generator(m, prefill_chunk=16), Generator(m, prefill_chunk=16, cpu_layout=False)
    assert fast.cpu_layout and not plain.cpu_layout
    assert {k: (v.dtype, v.shape) for k, v in jax.tree_util.tree_leaves_with_path(nnx.state(m))} == before
    dtypes = {jax.tree_util.keystr(k): str(v.dtype) for k, v in jax.tree_util.tree_leaves_with_path(fast.state)}
    assert {d for k, d in dtypes.items() if "'gate_up'" in k or "'o'" in k or "lm_head" in k} == {"float32"}
    assert {d for k, d in dtypes.items() if "norm" in k} == {"bfloat16"}
    assert dtypes["['embed'].value"] == "uint16"
    assert sum("'qkv'" in k for k in dtypes) == cfg.num_layers  # one array per layer

    p = _prompt(30, 4)
    tokens, positions = pad_left([p], 32, 0)
    logits = [
        _prefill_chunk(g.graphdef, g.state, KVCache.init(cfg, 1, 64), tokens, positions)[0] for g in (fast, plain)
    ]
    assert logits[0].dtype == jnp.float32  # bf16 products, rounded as the model's arrays' (XLA fuses the unrolled
    np.testing.assert_allclose(*jax.device_get(logits), atol=5e-3)  # layers apart: a bf16 ulp here and there)

    prompts = [_prompt(25, 1), _prompt(7, 2)]
    for sampling in (None, SAMPLED):
        kw = dict(max_new_tokens=10, stop_ids=(), sampling=sampling, seed=5)
        want = plain.generate(prompts, **kw).ids
        assert fast.generate(prompts, **kw).ids == want
        assert fast.generate_streaming(prompts, **kw).ids == want
    bf16_bytes = sum(x.nbytes for x in jax.tree.leaves(nnx.state(m, nnx.Param)))

    def temp(g, name):  # of the greedy decode (sampling adds its own work buffers)
        (key,) = [k for k in g._keys if k[0] == name and k[1].sampling == SamplingParams()]
        return _COMPILED[key].memory_analysis().temp_size_in_bytes

    temps = (temp(fast, "loop"), temp(fast, "step"), temp(plain, "loop"))
    assert max(temps[:2]) < 0.25 * bf16_bytes < bf16_bytes < temps[2], temps
