"""Renders the golden chat conversations with Kimi-K2-Instruct's published chat template.

Run from the repository root (needs jinja2, which is not a test dependency: the tests read the stored outputs):

    pip install jinja2 && python tests/golden/chat/make_golden.py

Reads `kimi_k2_instruct.jinja` (the template, see README.md for its source) and `conversations.json` (OpenAI-style
messages, tools, add_generation_prompt per case) and writes `rendered/<case>.txt`, the exact UTF-8 bytes the template
gives. The Jinja environment is the one Hugging Face transformers' `apply_chat_template` builds: a sandboxed
environment with trim_blocks and lstrip_blocks, the loopcontrols extension, and a `tojson` filter that is
`json.dumps(ensure_ascii=False)` with the default separators unless the template passes its own (jinja2's built-in
`tojson` would HTML-escape and sort keys, which transformers replaces). Running it again writes identical files.
"""

import json
import os
import sys

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

HERE = os.path.dirname(os.path.abspath(__file__))


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
  return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _raise(message):
  raise jinja2.exceptions.TemplateError(message)


def compile_template(text: str) -> jinja2.Template:
  env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
  env.filters['tojson'] = _tojson
  env.globals['raise_exception'] = _raise
  return env.from_string(text)


def main() -> int:
  with open(os.path.join(HERE, 'kimi_k2_instruct.jinja'), encoding='utf-8') as f:
    template = compile_template(f.read())
  with open(os.path.join(HERE, 'conversations.json'), encoding='utf-8') as f:
    cases = json.load(f)
  out_dir = os.path.join(HERE, 'rendered')
  os.makedirs(out_dir, exist_ok=True)
  names = [case['name'] for case in cases]
  assert len(set(names)) == len(names), 'case names must be unique'
  for case in cases:
    text = template.render(messages=case['messages'], tools=case.get('tools'),
                           add_generation_prompt=case['add_generation_prompt'])
    with open(os.path.join(out_dir, f'{case["name"]}.txt'), 'w', encoding='utf-8', newline='') as f:
      f.write(text)
    print(f'{case["name"]}: {len(text)} characters')
  stale = sorted(set(os.listdir(out_dir)) - {f'{name}.txt' for name in names})
  for name in stale:
    os.remove(os.path.join(out_dir, name))
  print(f'jinja2 {jinja2.__version__}; removed stale: {stale}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
