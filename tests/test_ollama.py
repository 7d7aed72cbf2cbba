"""`tinyllm export ollama`: the Modelfile's Go TEMPLATE renders byte-identical prompts to our Jinja chat template,
checked with Go's own text/template (tests/ollama_template/render.go, run the way Ollama's server runs a template)."""

import json
import shutil
import subprocess

import pytest

gguf = pytest.importorskip("gguf", reason='the Ollama export writes a GGUF: pip install "tinyllm-hf[quant]"')

from tinyllm_hf.cli import main as tinyllm  # noqa: E402
from tinyllm_hf.export.ollama import STOP_TOKENS, export_ollama  # noqa: E402
from tinyllm_hf.tokenizer.chat_template import CHAT_TEMPLATE, DEFAULT_SYSTEM_PROMPT, EOS_TOKEN  # noqa: E402

RENDERER = "tests/ollama_template/render.go"
IDIOM = "画蛇添足是什么意思？"
# (messages, enable_thinking): every shape the TEMPLATE claims to reproduce.
CONVERSATIONS = {
    "single turn": ([{"role": "user", "content": "你好"}], False),
    "system prompt": ([{"role": "system", "content": "你是一只猫。\n只说喵。"}, {"role": "user", "content": "你好"}], False),
    "multi-turn": ([{"role": "user", "content": "一加一等于几？"}, {"role": "assistant", "content": "二。"},
                    {"role": "user", "content": "再加一呢？"}, {"role": "assistant", "content": "三。"},
                    {"role": "user", "content": IDIOM}], False),
    "multi-turn with system": ([{"role": "system", "content": "简短回答。"}, {"role": "user", "content": "a\n\nb "},
                                {"role": "assistant", "content": " 好的\n"},
                                {"role": "user", "content": "{{ .Content }}"}], False),
    "thinking on": ([{"role": "user", "content": "(3+4)*5 等于多少？"}], True),
    "reasoning in history": ([{"role": "user", "content": "想一想"},
                              {"role": "assistant", "reasoning_content": "先算括号。", "content": "35。"},
                              {"role": "user", "content": "再想"}], True),
    "tool result": ([{"role": "user", "content": IDIOM}, {"role": "assistant", "content": "我查一下。"},
                     {"role": "tool", "content": "画蛇添足：比喻做了多余的事。"},
                     {"role": "tool", "content": "第二个结果"}], False),
    "empty conversation": ([], False),
}
# A final assistant message is left open for the model to continue: Ollama's prefill, transformers'
# continue_final_message.
PREFILL = [{"role": "system", "content": "简短回答。"}, {"role": "user", "content": IDIOM},
           {"role": "assistant", "content": "比喻"}]


def jinja_prompt(messages, enable_thinking=False, prefill=False):
    from transformers.utils.chat_template_utils import render_jinja_template

    rendered, _ = render_jinja_template([messages], chat_template=CHAT_TEMPLATE, add_generation_prompt=not prefill,
                                        continue_final_message=prefill, enable_thinking=enable_thinking)
    return rendered[0]


def _unquote(text: str) -> tuple[str, bool]:
    for quote in ('"""', '"'):
        if text.startswith(quote):
            complete = len(text) >= 2 * len(quote) and text.endswith(quote)
            return (text[len(quote):-len(quote)] if complete else ""), complete
    return text, True


def read_modelfile(modelfile: str) -> list[tuple[str, str]]:
    """(command, value) pairs as Ollama's Modelfile parser (parser/parser.go) reads them: `#` lines are comments;
    PARAMETER's first word is the parameter's name; a value ends at the first newline where what was read so
    far, stripped, is complete (triple-quoted, double-quoted or a bare word); inside it whitespace and printable
    characters are kept verbatim, with no escapes, and other characters are dropped."""
    commands, state, name, buffer = [], "nil", "", ""
    for char in modelfile + "\n":
        if state == "nil" and char == "#":
            state = "comment"
        elif state == "nil" and not char.isspace():
            state, buffer = "name", char
        elif state == "comment" and char in "\r\n":
            state = "nil"
        elif state in ("name", "parameter") and char in " \t":
            if state == "name" and buffer.lower() == "parameter":
                state, buffer = "parameter", ""
            else:
                name, state, buffer = (buffer if state == "parameter" else buffer.lower()), "value", ""
        elif state in ("name", "parameter"):
            buffer += char
        elif state == "value":
            value, complete = _unquote(buffer.strip())
            if char in "\r\n" and complete:
                commands.append((name, value))
                state, buffer = "nil", ""
            elif char.isprintable() or char.isspace():
                buffer += char
    assert state in ("nil", "comment"), f"Ollama would reject this Modelfile: unfinished {state} {buffer[:80]!r}"
    return commands


def modelfile_value(modelfile: str, command: str) -> str:
    [value] = [value for name, value in read_modelfile(modelfile) if name == command.lower()]
    return value


def go_render(modelfile: str, cases: list[tuple[list[dict], bool]], tmp_path) -> list[str]:
    go = shutil.which("go")
    if go is None:
        pytest.skip("the byte-identity check runs Go's text/template: apt-get install golang-go (.ci/run does)")
    request = {
        "template": modelfile_value(modelfile, "TEMPLATE"), "system": modelfile_value(modelfile, "SYSTEM"),
        "cases": [{"messages": [{"role": m["role"], "content": m["content"], "thinking": m.get("reasoning_content", "")}
                                for m in messages], "think": think} for messages, think in cases],
    }
    result = subprocess.run([go, "run", RENDERER], input=json.dumps(request), capture_output=True, text=True,
                            timeout=300, env={"HOME": str(tmp_path), "GOCACHE": str(tmp_path / "go-cache"),
                                              "PATH": "/usr/bin:/bin", "GO111MODULE": "off"})
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout)


@pytest.fixture(scope="module")
def exported(tiny_model_dir, tmp_path_factory):
    model = tmp_path_factory.mktemp("ollama-src") / "chat"
    shutil.copytree(tiny_model_dir, model)
    generation = json.loads((model / "generation_config.json").read_text())
    generation.update(do_sample=True, temperature=0.7, top_p=0.9, top_k=20, repetition_penalty=1.1)
    (model / "generation_config.json").write_text(json.dumps(generation))
    out = tmp_path_factory.mktemp("ollama") / "out"
    assert tinyllm(["export", "ollama", "--model", str(model), "--output", str(out), "--outtype", "q8_0"]) == 0
    return model, out


def test_template_renders_the_jinja_prompt_byte_for_byte(exported, tmp_path):
    modelfile = (exported[1] / "Modelfile").read_text("utf-8")
    cases = list(CONVERSATIONS.values()) + [(PREFILL, False)]
    rendered = go_render(modelfile, cases, tmp_path)
    expected = [jinja_prompt(messages, think) for messages, think in CONVERSATIONS.values()]
    expected.append(jinja_prompt(PREFILL, prefill=True))
    for name, got, want in zip(list(CONVERSATIONS) + ["prefill"], rendered, expected):
        assert got == want, name
    assert rendered[-1].endswith("<|assistant|>\n比喻") and EOS_TOKEN not in rendered[-1]


def test_modelfile_carries_the_stops_the_context_and_the_checkpoints_sampling_defaults(exported, tiny_model_dir):
    model, out = exported
    modelfile = (out / "Modelfile").read_text("utf-8")
    assert modelfile.splitlines()[1] == "FROM ./model.gguf"
    assert modelfile_value(modelfile, "SYSTEM") == DEFAULT_SYSTEM_PROMPT
    commands = read_modelfile(modelfile)
    assert commands[0] == ("from", "./model.gguf") and [name for name, _ in commands[1:3]] == ["template", "system"]
    assert [value for name, value in commands if name == "stop"] == list(STOP_TOKENS)
    values = {name: value for name, value in commands[3:] if name != "stop"}
    assert values == {"num_ctx": "256", "temperature": "0.7", "top_p": "0.9", "top_k": "20", "repeat_penalty": "1.1"}
    reader = gguf.GGUFReader(out / "model.gguf")
    assert reader.fields["general.file_type"].parts[-1][0] == gguf.LlamaFileType.MOSTLY_Q8_0
    assert sorted(p.name for p in out.iterdir()) == ["Modelfile", "model.gguf"]


def test_a_gguf_file_is_wrapped_as_it_is(exported, tmp_path):
    gguf_file = exported[1] / "model.gguf"
    out = tmp_path / "from-gguf"
    export_ollama(gguf_file, out)
    assert (out / "model.gguf").read_bytes() == gguf_file.read_bytes()
    modelfile = (out / "Modelfile").read_text("utf-8")
    assert "PARAMETER num_ctx 256\n" in modelfile and "temperature" not in modelfile  # no generation_config to read
    checkpoint_modelfile = (exported[1] / "Modelfile").read_text("utf-8")
    assert modelfile_value(modelfile, "TEMPLATE") == modelfile_value(checkpoint_modelfile, "TEMPLATE")


def test_greedy_checkpoints_get_temperature_zero(tiny_model_dir, tmp_path):
    model = tmp_path / "greedy"
    shutil.copytree(tiny_model_dir, model)
    (model / "generation_config.json").write_text(json.dumps({"do_sample": False, "temperature": 0.6}))
    export_ollama(model, tmp_path / "out")
    assert "PARAMETER temperature 0\n" in (tmp_path / "out" / "Modelfile").read_text()


def test_bad_inputs_stop_before_any_work(exported, tiny_model_dir, tmp_path, capsys):
    other = tmp_path / "other-format"
    shutil.copytree(tiny_model_dir, other)
    config = json.loads((other / "tokenizer_config.json").read_text())
    config["chat_template"] = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    (other / "tokenizer_config.json").write_text(json.dumps(config))
    (other / "chat_template.jinja").unlink(missing_ok=True)
    assert tinyllm(["export", "ollama", "--model", str(other), "--output", str(tmp_path / "o1")]) == 1
    err = capsys.readouterr().err
    assert "not the tinyllm chat format" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o1").exists()

    assert tinyllm(["export", "ollama", "--model", str(tmp_path / "nope.gguf"), "--output", str(tmp_path / "o2")]) == 1
    assert "GGUF file not found" in capsys.readouterr().err

    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    assert tinyllm(["export", "ollama", "--model", str(exported[0]), "--output", str(busy)]) == 1
    assert "not an empty folder" in capsys.readouterr().err and (busy / "keep.txt").read_text() == "mine"


def test_llama_cpp_tokenizes_the_rendered_prompts_as_our_tokenizer_does(exported, tmp_path):
    # Ollama's runner tokenizes the rendered prompt with llama.cpp, control strings parsed as tokens: the ids the
    # model sees must be the ids transformers' apply_chat_template gives it.
    llama_cpp = pytest.importorskip("llama_cpp", reason='needs llama-cpp-python: pip install "tinyllm-hf[llamacpp]"')
    from transformers import AutoTokenizer

    model, out = exported
    cases = [case for case in CONVERSATIONS.values() if case[0]]  # transformers refuses an empty conversation
    rendered = go_render((out / "Modelfile").read_text("utf-8"), cases, tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(model)
    llama = llama_cpp.Llama(str(out / "model.gguf"), vocab_only=True, verbose=False)
    for prompt, (messages, think) in zip(rendered, cases):
        expected = tokenizer.apply_chat_template(messages, add_generation_prompt=True, enable_thinking=think,
                                                 tokenize=True, return_dict=True)["input_ids"]
        assert llama.tokenize(prompt.encode("utf-8"), add_bos=False, special=True) == expected
