"""Kimi K2's chat format: rendering conversations (text, tokens, loss mask) and parsing tool calls.

    from k2 import chat
    rendered = chat.render([chat.Message('user', 'hi')], tokenizer, tools=[...], add_generation_prompt=True)
    rendered.tokens, rendered.loss_mask
    parsed = chat.parse_tool_calls(chat.decode(output_ids, tokenizer))   # .content, .tool_calls, .errors

`template` (the format, K2_REFERENCE.md section 5), `tool_parser` (never raises), `tools` (Python functions as
declared tools, and running parsed calls against them).
"""

from k2.chat.template import (CHAT_SPECIAL_TOKENS, DEFAULT_SYSTEM_PROMPT, K2_SPECIAL_TOKENS, Message, Rendered,
                              Segment, Tokenizer, ToolCall, check_tokenizer, decode, render, render_text, segments)
from k2.chat.tool_parser import ParsedOutput, parse_tool_calls
from k2.chat.tools import LOCAL_TOOLS, declaration, run_call

__all__ = ['CHAT_SPECIAL_TOKENS', 'DEFAULT_SYSTEM_PROMPT', 'K2_SPECIAL_TOKENS', 'LOCAL_TOOLS', 'Message',
           'ParsedOutput', 'Rendered', 'Segment', 'Tokenizer', 'ToolCall', 'check_tokenizer', 'declaration',
           'decode', 'parse_tool_calls', 'render', 'render_text', 'run_call', 'segments']
