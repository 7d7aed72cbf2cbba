"""The built-in tools: lookups in the embedded dictionaries, and a calculator.

A 1.85M-parameter model cannot memorise 31k idioms, but it can learn to ask the dictionary and copy the answer. Each
tool is a plain Python function with a Google-style docstring, so `transformers.utils.get_json_schema` makes its JSON
schema (what `apply_chat_template(tools=...)`, TRL's `GRPOTrainer(tools=...)` and the OpenAI API take). A lookup
searches every record, held-out ones included: held-out items are never trained on, but a real user's dictionary
holds them too. Every tool returns text - the entry, or a sentence saying nothing was found or what was wrong - and
never raises on bad input; `call_tool` turns anything else that goes wrong into such a sentence, so one bad call
never ends a conversation.
"""

import ast
import functools
import math
import operator
import unicodedata
from collections.abc import Callable

from tinyllm_hf.data.records import load_records

# Quote marks a user or model may put around the key ("「画蛇添足」").
_KEY_PUNCTUATION = " \t\n\r「」『』“”‘’\"'《》()（）。，,？?！!：:——"
NOT_FOUND = "未找到{what}「{key}」。"
MAX_EXPRESSION_CHARS = 200
MAX_EXPRESSION_NODES = 64
MAX_EXPONENT = 64
MAX_MAGNITUDE = 10**30


def lookup_key(text: str) -> str:
    return unicodedata.normalize("NFKC", str(text)).strip(_KEY_PUNCTUATION)


@functools.cache
def _index(kind: str, key: str) -> dict[str, list[dict]]:
    index: dict[str, list[dict]] = {}
    for record in load_records(kind).to_list():
        index.setdefault(lookup_key(record[key]), []).append(record)
    return index


def idiom_lookup(word: str) -> str:
    """查成语的解释。

    Args:
        word: 要查的成语
    """
    from tinyllm_hf.tasks.idioms import IDIOM_MEANING

    entries = _index("idioms", "word").get(lookup_key(word))
    return IDIOM_MEANING.answer(entries[0]) if entries else NOT_FOUND.format(what="成语", key=lookup_key(word))


def word_lookup(word: str) -> str:
    """查词语或汉字的释义。

    Args:
        word: 要查的词语或汉字
    """
    from tinyllm_hf.tasks.dictionary import CHAR_DEFINITION, WORD_DEFINITION

    key = lookup_key(word)
    if len(key) == 1:
        entries = _index("chars", "char").get(key)
        answer = CHAR_DEFINITION.answer(entries[0]) if entries else None
    else:
        entries = _index("words", "word").get(key)
        answer = WORD_DEFINITION.answer(entries[0]) if entries else None
    return answer or NOT_FOUND.format(what="汉字" if len(key) == 1 else "词语", key=key)


def xiehouyu_answers(riddle: str) -> list[str]:
    """Every second half the dictionary gives for a 歇后语's first half, in file order (a third of them have several)."""
    entries = _index("xiehouyu", "riddle").get(lookup_key(riddle), [])
    return list(dict.fromkeys(entry["answer"] for entry in entries))


def xiehouyu_lookup(riddle: str) -> str:
    """查歇后语的下半句。

    Args:
        riddle: 歇后语的上半句
    """
    answers = xiehouyu_answers(riddle)
    return "；".join(answers) if answers else NOT_FOUND.format(what="歇后语", key=lookup_key(riddle))


_OPERATORS: dict[type, Callable] = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow,
    ast.USub: operator.neg, ast.UAdd: operator.pos,
}
_CALCULATOR_SYMBOLS = str.maketrans({"×": "*", "÷": "/", "（": "(", "）": ")", "－": "-", "＋": "+", "＊": "*", "／": "/",
                                     "^": "**"})


class CalculatorError(ValueError):
    pass


def evaluate_arithmetic(expression: str) -> int | float:
    """The value of an arithmetic expression over numbers with + - * / // % ** and parentheses, walked on its syntax
    tree (never `eval`), bounded in length, size, exponent and magnitude."""
    text = unicodedata.normalize("NFKC", expression).translate(_CALCULATOR_SYMBOLS).strip().rstrip("=").strip()
    if not text:
        raise CalculatorError("表达式为空")
    if len(text) > MAX_EXPRESSION_CHARS:
        raise CalculatorError(f"表达式太长（最多 {MAX_EXPRESSION_CHARS} 个字符）")
    try:
        tree = ast.parse(text, mode="eval")
    except SyntaxError:
        raise CalculatorError(f"无法解析表达式「{expression}」") from None
    if sum(1 for _ in ast.walk(tree)) > MAX_EXPRESSION_NODES:
        raise CalculatorError("表达式太复杂")

    def value(node: ast.AST) -> int | float:
        if isinstance(node, ast.Expression):
            return value(node.body)
        if isinstance(node, ast.Constant) and type(node.value) in (int, float):
            return node.value
        if isinstance(node, ast.UnaryOp) and type(node.op) in _OPERATORS:
            return _OPERATORS[type(node.op)](value(node.operand))
        if isinstance(node, ast.BinOp) and type(node.op) in _OPERATORS:
            left, right = value(node.left), value(node.right)
            if isinstance(node.op, ast.Pow) and abs(right) > MAX_EXPONENT:
                raise CalculatorError(f"指数太大（最多 {MAX_EXPONENT}）")
            try:
                result = _OPERATORS[type(node.op)](left, right)
            except ZeroDivisionError:
                raise CalculatorError("除数不能为零") from None
            if isinstance(result, complex):
                raise CalculatorError("结果不是实数")
            if abs(result) > MAX_MAGNITUDE:
                raise CalculatorError("结果太大")
            return result
        raise CalculatorError(f"只能计算数字和 + - * / % ** 括号，不支持「{ast.unparse(node)}」")

    result = value(tree)
    if isinstance(result, float) and not math.isfinite(result):
        raise CalculatorError("结果不是有限的数")
    return result


def format_number(value: int | float) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return f"{value:.10g}" if isinstance(value, float) else str(value)


def calculator(expression: str) -> str:
    """计算算术式。

    Args:
        expression: 算术表达式，例如 (3+4)*5
    """
    try:
        return format_number(evaluate_arithmetic(expression))
    except CalculatorError as err:
        return f"计算错误：{err}。"


BUILTIN_TOOLS: dict[str, Callable[..., str]] = {
    tool.__name__: tool for tool in (idiom_lookup, word_lookup, xiehouyu_lookup, calculator)
}
