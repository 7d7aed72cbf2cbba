"""Reward functions for on-policy RL (`tinyllm grpo`, `tinyllm rloo`), combined with weights (`reward_weights`).

TRL calls each function as `f(prompts=..., completions=..., completion_ids=..., **dataset_columns)` and expects one
float per completion. Conversational prompts give each completion as messages: `[{"role": "assistant", "content":
text}]`, or with tools (`tinyllm grpo --tools builtin`) the whole rollout, `[assistant with tool_calls, tool, ...,
assistant]` (TRL parses each turn with the tokenizer's RESPONSE_TEMPLATE), and `completion_ids` then hold every turn
and the tool results between them. The answer the rewards judge is the content of the final assistant message; a
rollout that ends on a tool result or a call (cut off at max_completion_length or max_tool_calling_iterations) has none.

- `correctness` (rule-based, needs the `task` and `answer` columns of `build_prompt_dataset`): each task's own rule
  (`tinyllm_hf.tasks`: `Task.reward`): 1.0 when the reply equals the reference after normalisation (as the held-out
  evaluation checks). Otherwise sentiment scores 0.0 (a label is right or wrong: "正面" and "负面" share a character but
  not a meaning); the explanation-like tasks (idiom meaning, word definition, 歇后语), and tasks of your own prompts,
  score the character-overlap F1 with the reference as partial credit, which gives the policy a gradient before it can
  produce an exact answer.
- `format` (rule-based, needs the token ids): 1.0 for a well-formed reply, else 0.0. Well-formed: some text, ended by
  the end-of-turn token (not cut off at max_completion_length), no role token (`<|user|>` ...) generated and no role
  marker typed out as text, at most `max_completion_chars` characters. With tools it judges the final answer's turn
  (the tokens after the last tool result, whose `<|tool|>` ... `<|assistant|>` the chat template wrote).
- `tool_call` (rule-based, needs tools): the share of the tool calls the policy wrote that can run - JSON that
  parses, a known tool, arguments that fit its schema (`Toolbox.refusal`) - and 0.0 for a rollout without any call.
  A malformed call counts: TRL's parser drops it (and every call of its turn), but its `<tool_call>` token stays in
  the ids.
- `reward_model`: the scalar score of a trained reward model (`tinyllm reward`) on prompt + completion rendered with the
  chat template. It is handed to TRL as a model, so TRL batches it, puts it on the right device and wraps it for
  DeepSpeed; `load_reward_model` checks the folder first.
"""

import os
from dataclasses import dataclass, field
from pathlib import Path

from transformers import AutoModelForSequenceClassification

from tinyllm_hf.errors import MissingFileError, UsageError
from tinyllm_hf.model_utils import get_model, get_tokenizer
from tinyllm_hf.tasks import reply_reward
from tinyllm_hf.tokenizer.chat_template import ASSISTANT_TOKEN, SYSTEM_TOKEN, TOOL_CALL_START, TOOL_TOKEN, USER_TOKEN
from tinyllm_hf.options import comma_list
from tinyllm_hf.trainers.common import logger

REWARDS = ("correctness", "format", "reward_model", "tool_call")
ROLE_TOKENS = (SYSTEM_TOKEN, USER_TOKEN, ASSISTANT_TOKEN)


@dataclass
class RewardArguments:
    rewards: str = field(
        default="correctness,format",
        metadata={"help": f"reward functions, comma-separated, from {', '.join(REWARDS)}; weighted by reward_weights "
                          "in the same order"},
    )
    reward_model_path: str | None = field(
        default=None, metadata={"help": "folder of a reward model trained with `tinyllm reward` (for reward_model)"}
    )
    max_completion_chars: int = field(
        default=200, metadata={"help": "the format reward gives 0 to replies longer than this many characters"}
    )

    @property
    def names(self) -> list[str]:
        return comma_list(self.rewards)

    def __post_init__(self):
        unknown = sorted(set(self.names) - set(REWARDS))
        if unknown or not self.names:
            raise UsageError(f"rewards: unknown or empty {', '.join(unknown) or repr(self.rewards)}; "
                             f"choose from {', '.join(REWARDS)}")
        if len(set(self.names)) != len(self.names):
            raise UsageError(f"rewards: {self.rewards!r} names a reward twice")
        if "reward_model" in self.names and not self.reward_model_path:
            raise UsageError("the reward_model reward needs reward_model_path (a folder written by `tinyllm reward`)")
        if self.reward_model_path and "reward_model" not in self.names:
            # `tinyllm run` passes its reward stage's output to every GRPO recipe; a recipe may still leave it out.
            logger.warning(f"reward_model_path {self.reward_model_path} is not used: rewards are {self.rewards}")


def completion_text(completion) -> str:
    """The answer of one completion: a string, or the content of its final assistant message; "" when the rollout
    ended on a tool call or a tool result (it never answered)."""
    if isinstance(completion, str):
        return completion
    last = completion[-1]
    return last["content"] if last["role"] == "assistant" and not last.get("tool_calls") else ""


def correctness_reward(completions, answer, task, **kwargs) -> list[float]:
    """Each reply scored against its reference by its task's rule (`tinyllm_hf.tasks.reply_reward`)."""
    return [reply_reward(name, completion_text(completion), reference)
            for completion, reference, name in zip(completions, answer, task, strict=True)]


class FormatReward:
    """1.0 for a well-formed reply (see the module docstring), else 0.0. Reads the token ids, since the decoded text
    has the special tokens (the end-of-turn and role tokens) stripped."""

    __name__ = "format_reward"

    def __init__(self, tokenizer, max_chars: int = 200):
        self.eos_id = tokenizer.eos_token_id
        self.role_ids = {tokenizer.convert_tokens_to_ids(token) for token in ROLE_TOKENS}
        self.tool_id = tokenizer.convert_tokens_to_ids(TOOL_TOKEN)
        self.assistant_id = tokenizer.convert_tokens_to_ids(ASSISTANT_TOKEN)
        self.max_chars = max_chars

    def final_turn(self, ids: list[int]) -> list[int]:
        """The ids of the last assistant turn: those after the `<|assistant|>` that follows the last tool result."""
        if self.tool_id not in ids:
            return ids
        after_tool = ids[len(ids) - ids[::-1].index(self.tool_id):]
        return after_tool[after_tool.index(self.assistant_id) + 1:] if self.assistant_id in after_tool else []

    def is_well_formed(self, text: str, ids: list[int]) -> bool:
        return (
            bool(text.strip())
            and bool(ids) and ids[-1] == self.eos_id
            and not self.role_ids.intersection(ids)
            and not any(token in text for token in ROLE_TOKENS)
            and len(text) <= self.max_chars
        )

    def __call__(self, completions, completion_ids, **kwargs) -> list[float]:
        return [float(self.is_well_formed(completion_text(c), self.final_turn(list(ids))))
                for c, ids in zip(completions, completion_ids, strict=True)]


class ToolCallReward:
    """The share of the policy's tool calls that can run (see the module docstring)."""

    __name__ = "tool_call_reward"

    def __init__(self, tokenizer, toolbox):
        self.call_start_id = tokenizer.convert_tokens_to_ids(TOOL_CALL_START)
        self.toolbox = toolbox

    def valid_calls(self, completion) -> int:
        if isinstance(completion, str):
            return 0
        return sum(self.toolbox.refusal(call["function"]["name"], call["function"]["arguments"]) is None
                   for message in completion if message["role"] == "assistant"
                   for call in message.get("tool_calls") or [])

    def __call__(self, completions, completion_ids, **kwargs) -> list[float]:
        # Every `<tool_call>` in the ids is one the policy wrote: tool results are dictionary text, which holds none.
        attempts = [list(ids).count(self.call_start_id) for ids in completion_ids]
        return [self.valid_calls(c) / n if n else 0.0 for c, n in zip(completions, attempts, strict=True)]


def load_reward_model(path: str | os.PathLike, trust_remote_code: bool = False):
    """(model, tokenizer) of a `tinyllm reward` output folder, checked: one scalar output, a chat template, a pad token.
    Code shipped in the folder runs only with `trust_remote_code`."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise MissingFileError(f"reward model not found: {path} has no config.json (train one with `tinyllm reward`)")
    model = get_model(str(path), auto_class=AutoModelForSequenceClassification, trust_remote_code=trust_remote_code)
    if model.config.num_labels != 1:
        raise UsageError(f"{path}: a reward model has one output (num_labels=1), this one has {model.config.num_labels}")
    tokenizer = get_tokenizer(str(path), trust_remote_code=trust_remote_code)
    if not tokenizer.chat_template or tokenizer.pad_token is None:
        raise UsageError(f"{path}: the reward model's tokenizer needs a chat template and a pad token")
    model.config.pad_token_id = tokenizer.pad_token_id
    return model.eval(), tokenizer


def build_rewards(args: RewardArguments, tokenizer, toolbox=None, trust_remote_code: bool = False) -> tuple[list, list]:
    """(reward_funcs, reward_processing_classes) for TRL, in the order of `args.rewards`; `toolbox`: the tools the
    rollouts may call (`tinyllm_hf.inference.tool_loop.Toolbox`), which the tool_call reward needs;
    `trust_remote_code`: whether the reward model's shipped code may run."""
    if "tool_call" in args.names and toolbox is None:
        raise UsageError("the tool_call reward needs tools in the rollouts: tinyllm grpo --tools builtin (recipe key tools)")
    funcs, processing_classes = [], []
    for name in args.names:
        processing_class = None
        if name == "correctness":
            func = correctness_reward
        elif name == "format":
            func = FormatReward(tokenizer, args.max_completion_chars)
        elif name == "tool_call":
            func = ToolCallReward(tokenizer, toolbox)
        else:
            func, processing_class = load_reward_model(args.reward_model_path, trust_remote_code)
        funcs.append(func)
        processing_classes.append(processing_class)
    return funcs, processing_classes
