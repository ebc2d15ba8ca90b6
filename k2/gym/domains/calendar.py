"""Calendar: list a day's events, create, reschedule and cancel meetings within the working-hours policy.

Database: {'owner': name, 'next_id': int, 'events': {event_id: {title, date, start, duration_minutes, attendees}}}.
Event ids come from `next_id`, so an agent that creates the same events in the same order gets the same ids as
the gold actions. The tools accept any slot; keeping to working days and hours and not double-booking is the
agent's job.
"""

from __future__ import annotations

import datetime
import random
from typing import Any

from k2.chat import ToolCall
from k2.gym.env import Domain, Fact, Task, Tool, draw, draw_name, make_tool, sample_names

POLICY = """You manage the user's work calendar.
- Meetings are only on weekdays (Monday to Friday), starting at 08:00 or later and ending by 18:00.
- Never double-book: check the day with list_events before creating or moving a meeting, and refuse a slot that
  overlaps an existing meeting (name the meeting it would clash with).
- Refuse requests outside these rules and explain which rule they break.
- Dates are YYYY-MM-DD, times HH:MM (24-hour). If the user leaves out the date or the start time, ask for it."""

TITLES = ['budget review', 'design sync', 'one-on-one', 'hiring panel', 'sprint planning', 'customer call',
          'team lunch', 'roadmap workshop', 'security briefing', 'quarterly demo', 'vendor meeting', 'retro',
          'board prep', 'onboarding session', 'code review', 'marketing standup']
PEOPLE = ['Alice', 'Bruno', 'Chen', 'Dana', 'Emeka', 'Farah', 'Goran', 'Hana', 'Ivan', 'Julia', 'Karim', 'Lucia',
          'Marco', 'Nora', 'Oskar', 'Paula', 'Quinn', 'Rina', 'Samir', 'Tara']
PERSONAS = ('polite', 'terse', 'chatty', 'impatient')
MONTH_START = datetime.date(2027, 3, 1)

CREATE = ['Please schedule a {title} on {date} at {start} for {duration} minutes with {people}.',
          'Can you book "{title}" with {people} on {date}, starting {start}, {duration} minutes long?',
          'Set up {title}: {date}, {start}, {duration} min. Invite {people}.',
          'I need a {duration}-minute {title} with {people} on {date} at {start}.']
CREATE_ASK = ['Please schedule a {title} on {date} for {duration} minutes with {people}.',
              'Can you book "{title}" with {people} on {date}, {duration} minutes long?',
              'Set up {title} on {date}, {duration} min, with {people}.',
              'I need a {duration}-minute {title} with {people} on {date}.']
MOVE = ['Please move my {title} on {date} to {new_date} at {new_start}.',
        'Can you reschedule the {title} ({date}) to {new_start} on {new_date}?',
        'Shift {title} from {date} to {new_date}, {new_start}.',
        'My {title} on {date} needs to move to {new_date} at {new_start}, please.']
QUERY = ['What time does my {title} on {date} start?',
         'When is the {title} on {date}?',
         'Start time of {title}, {date}?',
         'Could you check when my {title} on {date} begins?']
ASK_TIME = ['Sure. What time should it start?', 'Happy to. When should the meeting start?',
            'Which start time would you like?', 'Of course. At what time should I put it?']


def _minutes(hhmm: str) -> int:
  hours, minutes = hhmm.split(':')
  return int(hours) * 60 + int(minutes)


def _hhmm(minutes: int) -> str:
  return f'{minutes // 60:02d}:{minutes % 60:02d}'


class CalendarTools:
  def __init__(self, db: dict[str, Any]):
    self.db = db

  def _event(self, event_id: str) -> dict[str, Any]:
    event = self.db['events'].get(event_id)
    if event is None:
      raise KeyError(f'no event {event_id}')
    return event

  def list_events(self, date: str) -> list:
    """Lists the events of one day (YYYY-MM-DD), with ids, sorted by start time."""
    events = [dict(event, event_id=event_id) for event_id, event in self.db['events'].items() if event['date'] == date]
    return sorted(events, key=lambda event: event['start'])

  def create_event(self, title: str, date: str, start: str, duration_minutes: int, attendees: list) -> dict:
    """Creates a meeting; returns its id."""
    datetime.date.fromisoformat(date)
    event_id = f'ev{self.db["next_id"]}'
    self.db['next_id'] += 1
    self.db['events'][event_id] = {'title': title, 'date': date, 'start': start,
                                   'duration_minutes': duration_minutes, 'attendees': sorted(attendees)}
    return {'event_id': event_id}

  def reschedule_event(self, event_id: str, date: str, start: str) -> dict:
    """Moves a meeting to another date and start time."""
    datetime.date.fromisoformat(date)
    event = self._event(event_id)
    event['date'], event['start'] = date, start
    return dict(event, event_id=event_id)

  def cancel_event(self, event_id: str) -> dict:
    """Deletes a meeting."""
    self._event(event_id)
    del self.db['events'][event_id]
    return {'cancelled': event_id}


class Calendar(Domain):
  name = 'calendar'
  policy = POLICY

  def tools(self, db: dict[str, Any]) -> dict[str, Tool]:
    t = CalendarTools(db)
    date = {'pattern': r'^\d{4}-\d{2}-\d{2}$', 'description': 'YYYY-MM-DD'}
    start = {'pattern': r'^([01]\d|2[0-3]):[0-5]\d$', 'description': 'HH:MM, 24-hour'}
    event_id = {'pattern': r'^ev\d+$'}
    return {tool.name: tool for tool in (
        make_tool(t.list_events, date=date),
        make_tool(t.create_event, title={'minLength': 1}, date=date, start=start,
                  duration_minutes={'minimum': 15, 'maximum': 480}, attendees={'items': {'type': 'string'}}),
        make_tool(t.reschedule_event, event_id=event_id, date=date, start=start),
        make_tool(t.cancel_event, event_id=event_id))}

  def sample_task(self, rng: random.Random, split: str, index: int) -> Task:
    weekdays = [MONTH_START + datetime.timedelta(days=d) for d in range(28)
                if (MONTH_START + datetime.timedelta(days=d)).weekday() < 5]
    weekend = [MONTH_START + datetime.timedelta(days=d) for d in range(28)
               if (MONTH_START + datetime.timedelta(days=d)).weekday() >= 5]
    db: dict[str, Any] = {'owner': draw_name(rng, PEOPLE, split), 'next_id': 1, 'events': {}}
    titles = sample_names(rng, TITLES, split, 4)
    day, other_day = (d.isoformat() for d in rng.sample(weekdays, 2))
    # The day holds two meetings (starting 09:00-10:45 and 14:00-14:45, at most an hour long), another day one more;
    # 12:00-13:30 and 16:15-17:30 stay free on the day.
    for title, date, window in ((titles[0], day, (9 * 60, 11 * 60)), (titles[1], day, (14 * 60, 15 * 60)),
                                (titles[2], other_day, (8 * 60, 16 * 60))):
      db['events'][f'ev{db["next_id"]}'] = {
          'title': title, 'date': date, 'start': _hhmm(rng.randrange(*window, 15)),
          'duration_minutes': rng.choice([30, 45, 60]), 'attendees': sorted(sample_names(rng, PEOPLE, split, 2))}
      db['next_id'] += 1
    people = sorted(sample_names(rng, PEOPLE, split, rng.randrange(1, 3)))
    duration = rng.choice([30, 45, 60])
    free_start = _hhmm(rng.choice([12 * 60, 12 * 60 + 15, 16 * 60 + 15, 16 * 60 + 30]))  # after both morning slots
    fill = dict(title=titles[3], date=day, start=free_start, duration=duration, people=' and '.join(people))
    facts = (Fact('start', free_start, ('time', 'when', 'start'), f'Let us say {free_start}.'),
             Fact('date', day, ('date', 'which day', 'what day'), f'It is on {day}.'))
    common = dict(domain=self.name, task_id=f'{self.name}-{split}-{index}-{rng.randrange(10 ** 6)}', split=split,
                  persona=rng.choice(PERSONAS), initial_db=db, facts=facts,
                  entities=tuple(titles + people + [db['owner']]))
    lookup = ToolCall('list_events', {'date': day})
    create = ToolCall('create_event', {'title': titles[3], 'date': day, 'start': free_start,
                                       'duration_minutes': duration, 'attendees': people})
    booked = f'Booked "{titles[3]}" on {day} at {free_start} for {duration} minutes with {fill["people"]}.'
    kind = rng.choice(['create', 'move', 'query', 'ask', 'refuse_clash', 'refuse_rules'])
    if kind == 'create':
      return Task(kind='act', instruction=draw(rng, CREATE, split).format(**fill), gold_actions=(lookup, create),
                  required_facts=(free_start,), expert_final=booked, **common)
    if kind == 'ask':
      return Task(kind='ask', instruction=draw(rng, CREATE_ASK, split).format(**fill), withheld=('start',),
                  gold_actions=(lookup, create), required_facts=(free_start,), expert_ask=draw(rng, ASK_TIME, split),
                  expert_final=booked, **common)
    first = db['events']['ev1']
    if kind == 'query':
      return Task(kind='act', instruction=draw(rng, QUERY, split).format(title=first['title'], date=day),
                  gold_actions=(lookup,), required_facts=(first['start'],),
                  expert_final=f'Your {first["title"]} on {day} starts at {first["start"]}.', **common)
    if kind == 'move':
      new_date = rng.choice([d for d in weekdays if d.isoformat() != other_day]).isoformat()
      if new_date == day:
        new_start = free_start  # a slot free of this day's other meeting
      else:
        new_start = _hhmm(rng.randrange(8 * 60, 16 * 60 + 1, 30))
      fill = dict(title=first['title'], date=day, new_date=new_date, new_start=new_start)
      gold = (lookup, ToolCall('list_events', {'date': new_date}),
              ToolCall('reschedule_event', {'event_id': 'ev1', 'date': new_date, 'start': new_start}))
      if new_date == day:
        gold = (lookup, gold[2])
      return Task(kind='act', instruction=draw(rng, MOVE, split).format(**fill), gold_actions=gold,
                  required_facts=(new_start,),
                  expert_final=f'Moved {first["title"]} to {new_date} at {new_start}.', **common)
    if kind == 'refuse_clash':  # the requested start falls inside the first meeting
      clash = _hhmm(_minutes(first['start']) + 15)
      return Task(kind='refuse', instruction=draw(rng, CREATE, split).format(**dict(fill, start=clash)),
                  gold_actions=(lookup,), required_facts=(first['title'],),
                  forbidden_actions=(ToolCall('create_event', dict(create.arguments, start=clash)),),
                  expert_final=(f'I cannot book that: {clash} on {day} overlaps your {first["title"]} '
                                f'at {first["start"]}. Would another time work?'), **common)
    bad_date, bad_start = day, rng.choice(['06:30', '07:00', '18:30', '19:00', '21:15'])
    reason = f'{bad_start} is outside working hours (08:00 to 18:00)'
    if rng.random() < 0.5:
      bad_date, bad_start = rng.choice(weekend).isoformat(), free_start
      reason = f'{bad_date} is a weekend day and meetings are only on weekdays'
    instruction = draw(rng, CREATE, split).format(**dict(fill, date=bad_date, start=bad_start))
    return Task(kind='refuse', instruction=instruction, gold_actions=(),
                expert_final=f'Sorry, I am not allowed to book that: {reason}.',
                forbidden_actions=(ToolCall('create_event', dict(create.arguments, date=bad_date, start=bad_start)),),
                **common)
