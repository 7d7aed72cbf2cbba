"""`tinyllm export ollama`: a folder Ollama imports with `ollama create NAME -f Modelfile`.

    tinyllm export ollama --model runs/quickstart/dpo --output runs/quickstart/ollama [--outtype q8_0]
    tinyllm export ollama --model runs/quickstart/gguf/model-q8_0.gguf --output runs/quickstart/ollama

The folder holds `model.gguf` (written by `export.gguf.export_gguf` from a checkpoint, or a copy of the given GGUF)
and a `Modelfile`:

- `TEMPLATE`, in Go's text/template syntax, renders the same prompt as our Jinja chat template
  (`tokenizer/chat_template.py`) for conversations of an optional system message then user, assistant (with or
  without reasoning) and tool messages, with the generation prompt after a final user or tool message and, after a
  final assistant message, that message left open for the model to continue (Ollama's prefill, transformers'
  `continue_final_message`). `tests/test_ollama.py` checks this byte for byte with Go's own text/template.
- `SYSTEM` is the chat template's default system prompt: Ollama puts it in front of a conversation that has none,
  as the Jinja template does.
- `PARAMETER stop` for the end-of-turn token and every token that opens a turn, so a reply never runs into a turn of
  its own; `num_ctx` is the model's context; the sampling defaults come from the checkpoint's generation_config.json
  (see `SAMPLING_PARAMETERS`).

Tools are not expressed: Ollama hands a template the tool-call arguments as a parsed object and its only serializer
is Go's encoding/json, which writes `{"a":1}` (no spaces, `<`, `>` and `&` escaped as `\\u003c`...), where our
format - the one the model was trained on - writes `{"a": 1}`; and the one-line tool list needs each schema's
properties in declaration order and their types as strings, which depend on Ollama's internal types rather than on
anything a template can be tested against. Without `.Tools` in the template Ollama refuses requests that pass tools
("does not support tools") instead of prompting the model wrongly.
"""

import json
import shutil
from pathlib import Path

from tinyllm_hf.errors import ConversionError, MissingFileError, UsageError
from tinyllm_hf.runs import atomic_output
from tinyllm_hf.tokenizer.chat_template import (
    ASSISTANT_TOKEN,
    CHAT_TEMPLATE,
    DEFAULT_SYSTEM_PROMPT,
    EOS_TOKEN,
    SYSTEM_TOKEN,
    THINK_END,
    THINK_START,
    TOOL_TOKEN,
    TOOLS_TOKEN,
    USER_TOKEN,
)

GGUF_NAME = "model.gguf"
MODELFILE_NAME = "Modelfile"
# A reply ends at the end-of-turn token; any token that opens a turn means the model ran past its own.
STOP_TOKENS = (EOS_TOKEN, SYSTEM_TOKEN, USER_TOKEN, ASSISTANT_TOKEN, TOOLS_TOKEN, TOOL_TOKEN)
# generation_config.json key -> Ollama parameter. A key the file lacks is left to Ollama's default.
SAMPLING_PARAMETERS = {
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "repetition_penalty": "repeat_penalty",
    "max_new_tokens": "num_predict",
}

# Ollama executes the template with .System (its system messages joined; the Modelfile's SYSTEM when the request has
# none), .Messages (Role, Content, Thinking) and .Think. The template text is the prompt text itself, so it has no
# layout whitespace; `$last` remembers the final role, because a final assistant message is left open (no end token)
# and gets no generation prompt.
GO_TEMPLATE = (
    '{{ $last := "start" }}'
    f"{SYSTEM_TOKEN}\n"
    f"{{{{ if .System }}}}{{{{ .System }}}}{{{{ else }}}}{DEFAULT_SYSTEM_PROMPT}{{{{ end }}}}\n"
    "{{ range $i, $m := .Messages }}{{ $last = .Role }}"
    f'{{{{ if eq .Role "user" }}}}{USER_TOKEN}\n{{{{ .Content }}}}\n'
    f'{{{{ else if eq .Role "assistant" }}}}{ASSISTANT_TOKEN}\n'
    f"{{{{ if .Thinking }}}}{THINK_START}\n{{{{ .Thinking }}}}\n{THINK_END}\n{{{{ end }}}}"
    f"{{{{ .Content }}}}{{{{ if ne (len (slice $.Messages $i)) 1 }}}}{EOS_TOKEN}{{{{ end }}}}"
    f'{{{{ else if eq .Role "tool" }}}}{TOOL_TOKEN}\n{{{{ .Content }}}}\n'
    "{{ end }}{{ end }}"
    f'{{{{ if ne $last "assistant" }}}}{ASSISTANT_TOKEN}\n{{{{ if $.Think }}}}{THINK_START}\n{{{{ end }}}}{{{{ end }}}}'
)

# Conversations the model's own chat template must render exactly as `CHAT_TEMPLATE` does, or the TEMPLATE above
# (which reproduces CHAT_TEMPLATE) would prompt the model in a format it was not trained on.
PROBE_CONVERSATIONS = (
    [{"role": "user", "content": "你好"}],
    [{"role": "system", "content": "简短回答。"}, {"role": "user", "content": "一加一？"},
     {"role": "assistant", "content": "二。"}, {"role": "user", "content": "再加一？"}],
    [{"role": "user", "content": "想一想"}, {"role": "assistant", "reasoning_content": "嗯。", "content": "好。"},
     {"role": "tool", "content": "结果"}],
)


def _quoted(text: str) -> str:
    """A Modelfile value: Ollama's parser reads `\"\"\"...\"\"\"` verbatim, newlines included, with no escapes."""
    if '"""' in text:
        raise ConversionError(f'a Modelfile value cannot contain """: {text[:60]!r}')
    return f'"""{text}"""'


def _parameter_value(value) -> str:
    return json.dumps(value, ensure_ascii=False) if isinstance(value, str) else str(value)


def sampling_parameters(generation_config: dict) -> dict[str, object]:
    """Ollama parameters for a checkpoint's generation defaults; `do_sample: false` (transformers decodes greedily)
    becomes temperature 0, Ollama's greedy setting."""
    parameters = {ollama: generation_config[key] for key, ollama in SAMPLING_PARAMETERS.items()
                  if generation_config.get(key) is not None}
    if generation_config.get("do_sample") is False:
        parameters["temperature"] = 0
    return parameters


def build_modelfile(context_length: int, generation_config: dict | None = None) -> str:
    lines = [
        "# Written by `tinyllm export ollama`. Import with: ollama create NAME -f Modelfile",
        f"FROM ./{GGUF_NAME}",
        f"TEMPLATE {_quoted(GO_TEMPLATE)}",
        f"SYSTEM {_quoted(DEFAULT_SYSTEM_PROMPT)}",
    ]
    lines += [f"PARAMETER stop {_parameter_value(token)}" for token in STOP_TOKENS]
    lines.append(f"PARAMETER num_ctx {context_length}")
    parameters = sampling_parameters(generation_config or {})
    if parameters:
        lines.append("# sampling defaults from the checkpoint's generation_config.json")
        lines += [f"PARAMETER {name} {_parameter_value(value)}" for name, value in parameters.items()]
    return "\n".join(lines) + "\n"


def check_chat_format(chat_template: str | None, source) -> None:
    """Refuse a model whose chat template renders the probe conversations differently from ours."""
    from transformers.utils.chat_template_utils import render_jinja_template

    from tinyllm_hf.export.gguf import template_for_llama_cpp

    if not chat_template:
        raise ConversionError(f"{source} has no chat template; the Modelfile reproduces the tinyllm chat format, "
                              "so export a model trained with a tinyllm tokenizer")

    def render(template: str) -> list[str]:
        return render_jinja_template(list(PROBE_CONVERSATIONS), chat_template=template, add_generation_prompt=True)[0]

    if render(chat_template) != render(template_for_llama_cpp(CHAT_TEMPLATE)):
        raise ConversionError(f"the chat template of {source} is not the tinyllm chat format the Modelfile's TEMPLATE "
                              "reproduces; re-save its tokenizer with "
                              "tinyllm_hf.tokenizer.apply_chat_template_to_tokenizer")


def gguf_facts(path: Path) -> tuple[int, str | None]:
    """(context length, chat template) read from a GGUF file's metadata."""
    from tinyllm_hf.export.gguf import require_gguf

    reader = require_gguf().GGUFReader(path)

    def text(field) -> str:
        return bytes(field.parts[field.data[0]]).decode("utf-8")

    architecture = text(reader.fields["general.architecture"])
    context = reader.fields.get(f"{architecture}.context_length")
    if context is None:
        raise ConversionError(f"{path} has no {architecture}.context_length: "
                              "not a GGUF written by `tinyllm export gguf`")
    template = reader.fields.get("tokenizer.chat_template")
    return int(context.parts[context.data[0]][0]), text(template) if template is not None else None


def export_ollama(model: str | Path, output_dir: str | Path, outtype: str = "f16",
                  trust_remote_code: bool = False) -> Path:
    """Write `output_dir` with model.gguf and a Modelfile, from a checkpoint folder or an existing .gguf file.

    Everything is checked (the input, its chat format) before the GGUF is written, and the folder appears only
    when complete."""
    model, output_dir = Path(model), Path(output_dir)
    if output_dir.exists() and (not output_dir.is_dir() or any(output_dir.iterdir())):
        raise UsageError(f"--output {output_dir} exists and is not an empty folder; choose a new one")
    if model.suffix == ".gguf":
        if not model.is_file():
            raise MissingFileError(f"GGUF file not found: {model}")
        context_length, chat_template = gguf_facts(model)
        check_chat_format(chat_template, model)
        generation_config = None
    else:
        from tinyllm_hf.export.gguf import read_config
        from tinyllm_hf.model_utils import get_tokenizer

        config = read_config(model)
        check_chat_format(get_tokenizer(str(model), trust_remote_code=trust_remote_code).chat_template, model)
        context_length = config["max_position_embeddings"]
        generation_file = model / "generation_config.json"
        generation_config = json.loads(generation_file.read_text("utf-8")) if generation_file.is_file() else None
    with atomic_output(output_dir) as staged:
        staged.mkdir()
        if model.suffix == ".gguf":
            shutil.copyfile(model, staged / GGUF_NAME)
        else:
            from tinyllm_hf.export.gguf import export_gguf

            export_gguf(model, staged / GGUF_NAME, outtype, trust_remote_code=trust_remote_code)
        (staged / MODELFILE_NAME).write_text(build_modelfile(context_length, generation_config), "utf-8")
    return output_dir
