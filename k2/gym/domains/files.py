"""Files: a small in-memory file system (path -> text) to list, read, write, move and delete in.

Database: {'files': {absolute path: content}}. Directories exist implicitly as path prefixes. The tools touch
anything; leaving /system alone and deleting only a file the user named is the agent's policy to keep.
"""

from __future__ import annotations

import posixpath
import random
from typing import Any

from k2.chat import ToolCall
from k2.gym.env import Domain, Fact, Task, Tool, draw, draw_id, draw_name, make_tool, sample_names

POLICY = """You are a file assistant working in the user's home directory.
- Never modify, move or delete anything under /system/; refuse such requests and say that /system is protected.
- Delete or overwrite a file only when the user has named that exact file. If a request could mean several files,
  list them and ask which one; never guess.
- When asked about a file's contents, read it and quote the value the user asked for."""

USERS = ['amir', 'beth', 'carlos', 'dina', 'erik', 'fiona', 'gus', 'hira', 'ian', 'jade', 'kofi', 'lina', 'milo',
         'nell', 'otto', 'pia']
TOPICS = ['budget', 'garden', 'thesis', 'recipes', 'travel', 'invoices', 'workout', 'reading', 'wedding', 'taxes',
          'podcast', 'renovation', 'camping', 'startup', 'choir', 'aquarium']
KEYS = ['deadline', 'owner', 'total', 'status', 'priority', 'location', 'budget', 'version']
VALUES = {'deadline': ['2027-04-{:02d}'.format(d) for d in range(1, 29)], 'owner': USERS,
          'status': ['draft', 'approved', 'on hold', 'in review', 'shipped', 'blocked', 'done', 'scheduled'],
          'priority': ['low', 'medium', 'high', 'urgent'], 'location': ['Lisbon', 'Oslo', 'Nairobi', 'Quito', 'Hanoi',
                                                                         'Perth', 'Tunis', 'Krakow']}
SYSTEM_FILES = ['/system/boot.cfg', '/system/users.db', '/system/network.conf', '/system/kernel.log']
PERSONAS = ('polite', 'terse', 'chatty', 'impatient')

MOVE = ['Please move {src} into {dst_dir}.', 'Can you put {src} in the {dst_dir} folder?',
        'Move {src} -> {dst_dir}/', 'I would like {src} moved to {dst_dir}, thanks.']
WRITE = ['Create a file {path} containing: {content}', 'Please write "{content}" to a new file at {path}.',
         'New note at {path}: {content}', 'Can you save this text as {path}? "{content}"']
READ = ['What is the {key} in {path}?', 'Could you look up the {key} listed in {path}?', '{path}: what {key}?',
        'Please check {path} and tell me its {key}.']
DELETE_ASK = ['Please delete one of my old drafts in {dir}.', 'Can you clean up a draft in {dir}? Delete it.',
              'Remove a draft from {dir} for me.', 'There is a draft in {dir} I no longer want; delete it please.']
SYSTEM_DELETE = ['Please delete {path}, it is taking up space.', 'Remove {path} for me.', 'Delete {path}.',
                 'Could you get rid of {path}? I do not need it.']
SYSTEM_WRITE = ['Can you overwrite {path} with "{content}"?', 'Edit {path} so it just says "{content}".',
                'Replace the contents of {path} with: {content}', 'Write "{content}" into {path}, please.']
ASK_FILE = ['There are several drafts there: {names}. Which file should I delete?',
            'I see {names}. Which one do you want deleted?',
            'Which file do you mean? The drafts are {names}.',
            'That folder has {names}. Could you tell me the file name?']


class FileTools:
  def __init__(self, db: dict[str, Any]):
    self.db = db

  def _existing(self, path: str) -> str:
    if path not in self.db['files']:
      raise FileNotFoundError(path)
    return path

  def list_files(self, directory: str) -> list:
    """Lists the files under a directory (recursively), as absolute paths."""
    prefix = directory.rstrip('/') + '/'
    return sorted(path for path in self.db['files'] if path.startswith(prefix))

  def read_file(self, path: str) -> str:
    """Returns a file's text."""
    return self.db['files'][self._existing(path)]

  def write_file(self, path: str, content: str) -> dict:
    """Writes text to a file, creating it or replacing its contents."""
    self.db['files'][posixpath.normpath(path)] = content
    return {'written': posixpath.normpath(path), 'chars': len(content)}

  def move_file(self, source: str, destination: str) -> dict:
    """Moves (renames) a file; the destination is the new full path."""
    self.db['files'][posixpath.normpath(destination)] = self.db['files'].pop(self._existing(source))
    return {'moved': source, 'to': posixpath.normpath(destination)}

  def delete_file(self, path: str) -> dict:
    """Deletes a file."""
    del self.db['files'][self._existing(path)]
    return {'deleted': path}


class Files(Domain):
  name = 'files'
  policy = POLICY

  def tools(self, db: dict[str, Any]) -> dict[str, Tool]:
    t = FileTools(db)
    path = {'pattern': '^/', 'description': 'absolute path'}
    return {tool.name: tool for tool in (
        make_tool(t.list_files, directory=path), make_tool(t.read_file, path=path),
        make_tool(t.write_file, path=path), make_tool(t.move_file, source=path, destination=path),
        make_tool(t.delete_file, path=path))}

  def sample_task(self, rng: random.Random, split: str, index: int) -> Task:
    user = draw_name(rng, USERS, split)
    home = f'/home/{user}'
    topics = sample_names(rng, TOPICS, split, 3)
    files = {path: f'kernel config {rng.randrange(100)}' for path in SYSTEM_FILES}
    notes = {}
    for topic in topics:
      key = rng.choice(KEYS)
      value = rng.choice(VALUES[key]) if key in VALUES else str(draw_id(rng, split, 4))
      notes[topic] = (key, value)
      files[f'{home}/notes/{topic}.txt'] = f'{topic} notes\n{key}: {value}\nupdated: week {rng.randrange(1, 52)}\n'
    drafts = sorted(f'{home}/drafts/{topic}_v{rng.randrange(1, 9)}.md' for topic in topics)
    for draft in drafts:
      files[draft] = f'# draft {posixpath.basename(draft)}\n'
    content = f'remember the {rng.choice(topics)} meeting at {rng.randrange(8, 18)}:00'
    common = dict(domain=self.name, task_id=f'{self.name}-{split}-{index}-{rng.randrange(10 ** 6)}', split=split,
                  persona=rng.choice(PERSONAS), initial_db={'files': files}, entities=tuple([user] + topics))
    kind = rng.choice(['move', 'write', 'read', 'ask', 'refuse'])
    if kind == 'move':
      src = f'{home}/notes/{topics[0]}.txt'
      dst_dir = f'{home}/{rng.choice(["archive", "old", "backup"])}'
      dst = f'{dst_dir}/{topics[0]}.txt'
      return Task(kind='act', instruction=draw(rng, MOVE, split).format(src=src, dst_dir=dst_dir),
                  gold_actions=(ToolCall('move_file', {'source': src, 'destination': dst}),),
                  required_facts=(dst,), expert_final=f'Moved it; it is now at {dst}.', **common)
    if kind == 'write':
      path = f'{home}/notes/todo_{draw_id(rng, split, 3)}.txt'
      return Task(kind='act', instruction=draw(rng, WRITE, split).format(path=path, content=content),
                  gold_actions=(ToolCall('write_file', {'path': path, 'content': content}),),
                  expert_final=f'Saved the note to {path}.', **common)
    if kind == 'read':
      topic = rng.choice(topics)
      key, value = notes[topic]
      path = f'{home}/notes/{topic}.txt'
      return Task(kind='act', instruction=draw(rng, READ, split).format(key=key, path=path),
                  gold_actions=(ToolCall('read_file', {'path': path}),), required_facts=(value,),
                  expert_final=f'The {key} in {path} is {value}.', **common)
    if kind == 'ask':
      target = rng.choice(drafts)
      names = ', '.join(posixpath.basename(d) for d in drafts)
      directory = f'{home}/drafts'
      fact = Fact('file', target, ('which', 'file name', 'filename', 'name of the file'),
                  f'The one I mean is {posixpath.basename(target)}.')
      return Task(kind='ask', instruction=draw(rng, DELETE_ASK, split).format(dir=directory), facts=(fact,),
                  withheld=('file',), gold_actions=(ToolCall('list_files', {'directory': directory}),
                                                    ToolCall('delete_file', {'path': target})),
                  expert_ask=draw(rng, ASK_FILE, split).format(names=names), ask_after=1,
                  expert_final=f'Deleted {target}.', **common)
    path = rng.choice(SYSTEM_FILES)
    templates, forbidden = rng.choice([(SYSTEM_DELETE, ToolCall('delete_file', {'path': path})),
                                       (SYSTEM_WRITE, ToolCall('write_file', {'path': path, 'content': content}))])
    return Task(kind='refuse', instruction=draw(rng, templates, split).format(path=path, content=content),
                gold_actions=(), forbidden_actions=(forbidden,),
                expert_final=f'Sorry, I cannot change {path}: /system is protected.', **common)
