"""Retail orders (after tau-bench's retail domain): look up a customer and their orders, cancel, change address.

Database: {'users': {user_id: {name, email, payment}}, 'orders': {order_id: {user_id, status, items, address,
total}}}. The tools do what they are asked; the policy (authenticate first, only pending orders change) is the
agent's to keep, so a refusal task can be failed by acting on it.
"""

from __future__ import annotations

import random
from typing import Any

from k2.chat import ToolCall
from k2.gym.env import Domain, Fact, Task, Tool, draw, draw_id, draw_name, make_tool, split_pool

POLICY = """You are a customer service agent for an online store. Help users look up, cancel or re-address their orders.
- Authenticate the user first: look up their account by the email they give (find_user_by_email).
- Only act on orders that belong to the authenticated user. Check an order with get_order before changing it.
- Only orders with status 'pending' can be cancelled or get a new shipping address. Refuse to cancel or change
  orders that are processed, shipped or delivered, and say why.
- A cancellation needs a reason: 'no longer needed' or 'ordered by mistake'. The refund goes to the original
  payment method; tell the user the refund amount.
- If the user leaves out something you need (which order, the reason), ask for it; never guess."""

FIRST = ['Olivia', 'Liam', 'Emma', 'Noah', 'Ava', 'Mateo', 'Sofia', 'Lucas', 'Mia', 'Ethan', 'Aisha', 'Yusuf',
         'Chloe', 'Hiro', 'Priya', 'Arjun', 'Lena', 'Tomas', 'Zara', 'Kenji', 'Nadia', 'Omar', 'Ingrid', 'Diego',
         'Fatima', 'Sven', 'Maya', 'Rafael', 'Elif', 'Jonas', 'Amara', 'Felix']
LAST = ['Garcia', 'Smith', 'Nguyen', 'Kowalski', 'Okafor', 'Rossi', 'Tanaka', 'Silva', 'Muller', 'Haddad',
        'Johansson', 'Patel', 'Dubois', 'Kim', 'Novak', 'Costa']
PRODUCTS = [('desk lamp', 34.99), ('yoga mat', 25.5), ('espresso machine', 189.0), ('wireless mouse', 19.99),
            ('hiking boots', 120.0), ('water bottle', 14.25), ('mechanical keyboard', 89.9), ('backpack', 59.95),
            ('air fryer', 99.0), ('bluetooth speaker', 45.75), ('office chair', 210.0), ('tea kettle', 32.4),
            ('running shoes', 95.0), ('phone case', 12.99), ('cookware set', 149.5), ('monitor stand', 41.2)]
STREETS = ['Maple Street', 'Oak Avenue', 'Harbor Road', 'Elm Lane', 'Cedar Court', 'Sunset Boulevard', 'Mill Road',
           'Pine Street', 'River Drive', 'Lake View', 'Station Road', 'Church Lane']
CITIES = ['Springfield', 'Riverton', 'Lakeside', 'Fairview', 'Greenville', 'Bridgeport', 'Ashford', 'Milton']
PAYMENTS = ['credit card ending in {n}', 'gift card {n}', 'PayPal account']
REASONS = {'no longer needed': ["I don't need it anymore", 'I no longer need it', 'plans changed and I do not need it'],
           'ordered by mistake': ['I ordered it by mistake', 'it was an accidental order', 'I clicked buy by accident']}
PERSONAS = ('polite', 'terse', 'chatty', 'impatient')

CANCEL = ['Hi, my email is {email}. Please cancel order {order_id}, {why}.',
          'Hello! I am {name} ({email}) and I want to cancel my order {order_id} because {why}.',
          'Cancel {order_id} for me please. Account email: {email}. Reason: {why}.',
          'Hey there, {name} here, email {email}. Could you cancel order {order_id}? {why_cap}.']
CANCEL_ASK = ['Hi, my email is {email}. I need to cancel one of my orders, {why}.',
              'Hello, this is {name} ({email}). I want to cancel an order because {why}.',
              'I would like an order cancelled. Email: {email}. {why_cap}.',
              'Hey, {name} here ({email}). Please cancel an order of mine, {why}.']
ADDRESS = ['Hi, I am {email}. Please ship order {order_id} to {address} instead.',
           'Hello, {name} here ({email}). I moved; can order {order_id} go to {address}?',
           'Change the shipping address of {order_id} to {address}. My email is {email}.',
           'Hey! Could you send my order {order_id} to {address}? Account: {email}.']
STATUS = ['Hi, my email is {email}. What is the status of order {order_id}?',
          'Hello, {name} ({email}) here. Where is my order {order_id}?',
          'Status of {order_id} please. Email {email}.',
          'Hey, could you check on order {order_id} for me? I am {email}.']
ASK_ORDER = ['Sure. Which order would you like to cancel? Please give me the order id.',
             'I can help with that. Could you tell me the order number?',
             'Happy to help. What is the order id of the order you want cancelled?',
             'Of course. Which order is it? I need its order number.']


class RetailTools:
  """The tool functions over one database."""

  def __init__(self, db: dict[str, Any]):
    self.db = db

  def _order(self, order_id: str) -> dict[str, Any]:
    order = self.db['orders'].get(order_id)
    if order is None:
      raise KeyError(f'order {order_id} not found')
    return order

  def find_user_by_email(self, email: str) -> dict:
    """Finds a customer account by email; returns the user id, name and order ids."""
    for user_id, user in self.db['users'].items():
      if user['email'] == email.strip().lower():
        orders = sorted(oid for oid, order in self.db['orders'].items() if order['user_id'] == user_id)
        return {'user_id': user_id, 'name': user['name'], 'orders': orders}
    raise KeyError(f'no user with email {email}')

  def get_order(self, order_id: str) -> dict:
    """Returns an order: owner, status, items, shipping address, total and payment method."""
    order = self._order(order_id)
    return dict(order, order_id=order_id, payment=self.db['users'][order['user_id']]['payment'])

  def cancel_order(self, order_id: str, reason: str) -> dict:
    """Cancels an order and refunds its total to the original payment method."""
    order = self._order(order_id)
    if order['status'] == 'cancelled':
      raise ValueError(f'order {order_id} is already cancelled')
    order['status'], order['cancel_reason'] = 'cancelled', reason
    return {'order_id': order_id, 'status': 'cancelled', 'refund': order['total']}

  def update_address(self, order_id: str, address: str) -> dict:
    """Changes the shipping address of an order."""
    order = self._order(order_id)
    order['address'] = address
    return {'order_id': order_id, 'address': address}


class Retail(Domain):
  name = 'retail'
  policy = POLICY

  def tools(self, db: dict[str, Any]) -> dict[str, Tool]:
    t = RetailTools(db)
    order_id = {'description': 'order id, e.g. #W12345', 'pattern': r'^#W\d+$'}
    return {tool.name: tool for tool in (
        make_tool(t.find_user_by_email, email={'description': 'the account email'}),
        make_tool(t.get_order, order_id=order_id),
        make_tool(t.cancel_order, order_id=order_id, reason={'enum': sorted(REASONS)}),
        make_tool(t.update_address, order_id=order_id, address={'minLength': 5}))}

  def _address(self, rng: random.Random, split: str) -> str:
    return f'{rng.randrange(1, 999)} {draw(rng, STREETS, split)}, {draw(rng, CITIES, split)}'

  def sample_task(self, rng: random.Random, split: str, index: int) -> Task:
    kind_name = rng.choice(['cancel', 'cancel', 'address', 'status', 'ask', 'refuse'])
    users, orders, entities = {}, {}, []
    for _ in range(3):  # the customer and two others whose orders sit in the same database
      first, last = draw_name(rng, FIRST, split), draw_name(rng, LAST, split)
      user_id = f'{first.lower()}_{last.lower()}_{draw_id(rng, split, 4)}'
      payment = rng.choice(PAYMENTS).format(n=draw_id(rng, split, 4))
      email = f'{first}.{last}{len(users)}{rng.randrange(10, 99)}@example.com'.lower()  # unique in the database
      users[user_id] = {'name': f'{first} {last}', 'email': email, 'payment': payment}
      for status in rng.sample(['pending', 'pending', 'processed', 'shipped', 'delivered'], 3):
        items = [{'product': p, 'price': price, 'quantity': rng.randrange(1, 4)}
                 for p, price in rng.sample(split_pool(PRODUCTS, split), rng.randrange(1, 3))]
        total = round(sum(item['price'] * item['quantity'] for item in items), 2)
        orders[f'#W{draw_id(rng, split)}'] = {'user_id': user_id, 'status': status, 'items': items,
                                             'address': self._address(rng, split), 'total': total}
      entities += [first, last, user_id]
    entities += list(orders)
    user_id = next(iter(users))
    user = users[user_id]
    mine = sorted(oid for oid, order in orders.items() if order['user_id'] == user_id)
    order_id = rng.choice(mine)
    order = orders[order_id]
    if kind_name in ('cancel', 'address', 'ask'):
      order['status'] = 'pending'
    elif kind_name == 'refuse':
      order['status'] = rng.choice(['shipped', 'delivered'])
    reason = rng.choice(sorted(REASONS))
    why = rng.choice(REASONS[reason])
    fill = dict(email=user['email'], name=user['name'], order_id=order_id, why=why, why_cap=why[0].upper() + why[1:])
    facts = [Fact('email', user['email'], ('email', 'e-mail'), f'My email is {user["email"]}.'),
             Fact('order_id', order_id, ('order id', 'order number', 'which order', 'id of the order', 'which one'),
                  f'It is order {order_id}.'),
             Fact('reason', reason, ('reason', 'why'), f'The reason: {why}.')]
    lookups = (ToolCall('find_user_by_email', {'email': user['email']}), ToolCall('get_order', {'order_id': order_id}))
    total = f'{order["total"]:.2f}'
    task = dict(domain=self.name, task_id=f'{self.name}-{split}-{index}-{order_id[2:]}', split=split,
                persona=rng.choice(PERSONAS), initial_db={'users': users, 'orders': orders},
                facts=tuple(facts), entities=tuple(entities))
    if kind_name in ('cancel', 'ask'):
      cancel = ToolCall('cancel_order', {'order_id': order_id, 'reason': reason})
      final = f'Order {order_id} is cancelled. A refund of ${total} goes back to your {user["payment"]}.'
      if kind_name == 'ask':
        return Task(kind='ask', instruction=draw(rng, CANCEL_ASK, split).format(**fill), withheld=('order_id',),
                    gold_actions=lookups + (cancel,), required_facts=(total,), expert_ask=draw(rng, ASK_ORDER, split),
                    expert_final=final, **task)
      return Task(kind='act', instruction=draw(rng, CANCEL, split).format(**fill), gold_actions=lookups + (cancel,),
                  required_facts=(total,), expert_final=final, **task)
    if kind_name == 'address':
      address = self._address(rng, split)
      return Task(kind='act', instruction=draw(rng, ADDRESS, split).format(address=address, **fill),
                  gold_actions=lookups + (ToolCall('update_address', {'order_id': order_id, 'address': address}),),
                  expert_final=f'Done: order {order_id} will now ship to {address}.', **task)
    if kind_name == 'status':
      return Task(kind='act', instruction=draw(rng, STATUS, split).format(**fill), gold_actions=lookups,
                  required_facts=(order['status'],),
                  expert_final=f'Order {order_id} is {order["status"]}; its total is ${total}.', **task)
    return Task(kind='refuse', instruction=draw(rng, CANCEL, split).format(**fill), gold_actions=lookups,
                forbidden_actions=(ToolCall('cancel_order', {'order_id': order_id, 'reason': reason}),),
                required_facts=(order['status'],),
                expert_final=(f'I am sorry, but order {order_id} is already {order["status"]}, so I cannot cancel it: '
                              'only pending orders can be cancelled.'), **task)
