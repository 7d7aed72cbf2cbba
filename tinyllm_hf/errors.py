"""Every error tinyllm-hf raises on purpose: one hierarchy under `TinyllmError`.

The `tinyllm` command turns any `TinyllmError` into one line on stderr, `tinyllm <command>: error: <message>`, and
exits with `TinyllmError.exit_code` (1); a command-line usage error keeps argparse's exit code 2. So a message must
name the problem and what to do next, since it is all the user sees.

Each class also derives from the built-in exception it replaces (`ValueError`, `FileNotFoundError`, ...), so callers
that catch the built-in keep working. The modeling files (`modeling/*_tinyllm.py`) ship as Hub remote code, import only
torch and transformers, and so raise plain `ValueError`s; the stages that build a model from user input turn those into
a `ConfigError`.
"""


class TinyllmError(Exception):
    """Base class: the input or the environment cannot do what was asked; the message says what to change."""

    exit_code = 1


class UsageError(TinyllmError, ValueError):
    """An argument, recipe key or data value is not accepted.

    >>> raise UsageError("unknown key(s) in recipe r.yaml: lr (see --help for the accepted keys)")
    """


class ConfigError(UsageError):
    """The model configuration a recipe asks for is invalid.

    >>> raise ConfigError("model_preset 'tiny' / config_overrides: TinyllmConfig.hidden_size must be a positive "
    ...                   "integer, got 0")
    """


class MissingFileError(TinyllmError, FileNotFoundError):
    """A file or folder named on the command line or in a recipe does not exist.

    >>> raise MissingFileError("pipeline recipe not found: recipes/nope.yaml")
    """


class OutputExistsError(TinyllmError, FileExistsError):
    """The output folder already holds something; pass --overwrite or choose a new folder."""


class MissingDependencyError(TinyllmError, ImportError):
    """An optional package a command needs is not installed; the message names the `pip install` to run.

    >>> raise MissingDependencyError('GGUF export needs the `gguf` package: pip install "tinyllm-hf[quant]"')
    """


class ExternalToolError(TinyllmError, RuntimeError):
    """A tool tinyllm-hf drives (llama.cpp's quantizer, ...) reported a failure; the message gives its status."""


class DatasetUnavailableError(TinyllmError, RuntimeError):
    """A benchmark or dataset could not be fetched from the Hub (offline, or the dataset cannot be read)."""


class MalformedRowError(UsageError):
    """A row of an instruction dataset cannot be turned into a valid conversation.

    >>> raise MalformedRowError("prompts.jsonl:3: missing field prompt")
    """


class ConversionError(UsageError):
    """The checkpoint uses something the target architecture cannot express.

    >>> raise ConversionError("Llama mlp_bias=True; Tinyllm's MLP has no biases")
    """


class QuantizeError(UsageError):
    """Input `tinyllm quantize` cannot work with; the message says what to change."""


class ReleaseError(UsageError):
    """The folder cannot be released on the Hub as asked."""


class PipelineError(TinyllmError, RuntimeError):
    """A stage of `tinyllm run` failed; the message names its log file.

    >>> raise PipelineError("stage sft failed (exit 1); see runs/quickstart/logs/sft.log")
    """


class PreflightError(TinyllmError, RuntimeError):
    """`tinyllm run`'s checks before stage 1 found something missing; the message lists each with its fix.

    >>> raise PreflightError("preflight: 1 check(s) failed ...: [FAIL] sft: extra flash-attn (...): not installed: ...")
    """


class NonFiniteLossError(TinyllmError, RuntimeError):
    """Training produced a NaN or infinite loss; lower the learning rate or check the data."""


class EngineOverloaded(TinyllmError, RuntimeError):
    """The inference engine's request queue is full; retry later (the server answers it with HTTP 503)."""


class GenerationError(TinyllmError, RuntimeError):
    """The engine ended a sequence before its EOS or budget (a timeout, a runtime error, the engine closing)."""


class APIError(TinyllmError):
    """An OpenAI-compatible API request the server refuses; carries the HTTP status and the error body's fields."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param=None, code=None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
