"""Bank: a customer's accounts to look up, move money between, and block cards of.

Database: {'customer': name, 'accounts': {account id: {'owner', 'type', 'balance'}}, 'cards': {card id: {'account',
'blocked'}}, 'transfers': [...]}. The tools let anyone move anything; transferring only between the customer's own
accounts and never more than the balance is the agent's policy to keep. The embedded synthesis leaves this domain
out, so an SFT'd model meets it for the first time in the agent evaluation (experiments/eval_agent.py).
"""

from __future__ import annotations

import random
from typing import Any

from k2.chat import ToolCall
from k2.gym.env import Domain, Fact, Task, Tool, draw, draw_id, draw_name, make_tool

POLICY = """You are a bank's support agent for the customer you are talking to.
- Move money only between accounts the customer owns, and never more than the source account's balance; refuse
  other transfers and say why.
- If the customer has several accounts of the kind they mention and did not say which, ask for the account id.
- Block a card only when the customer asks for it; quote balances exactly as the tools return them."""

CUSTOMERS = ['Ana Lima', 'Bo Chen', 'Cleo Martin', 'Dev Rao', 'Ema Novak', 'Finn Berg', 'Gia Russo', 'Hugo Weiss',
             'Ines Sato', 'Jon Park', 'Kira Stone', 'Leo Dubois', 'Mia Ferri', 'Noor Aziz', 'Olga Petrov', 'Pavel Hus']
STRANGERS = ['Quinn Hale', 'Rosa Vidal', 'Sam Ortiz', 'Tara Bose']
BALANCE = ['What is the balance of my {type} account {account}?', 'How much money is in account {account}?',
           'Can you check my {type} account {account} balance?', 'Balance for {account}, please.']
MOVE = ['Please move {amount} from my {src_type} account {src} to my {dst_type} account {dst}.',
        'Transfer {amount} from {src} to {dst}, both are mine.', 'Can you send {amount} from account {src} to {dst}?',
        'I want {amount} moved from {src} into {dst}.']
BLOCK = ['I lost my card {card}, please block it.', 'Block card {card} right away.',
         'My card {card} was stolen. Can you block it?', 'Please freeze card {card}.']
ASK_MOVE = ['Please put {amount} into my {dst_type} account {dst} from my checking account.',
            'Move {amount} from my checking to {dst}, please.', 'Can you transfer {amount} to {dst} from checking?',
            'Top up {dst} with {amount} from checking.']
STRANGER_MOVE = ['Send {amount} from my account {src} to {dst}, it belongs to {stranger}.',
                 'Please transfer {amount} from {src} to {stranger}\'s account {dst}.',
                 'Pay {stranger} {amount} from {src}; their account is {dst}.',
                 'Move {amount} from {src} to account {dst} ({stranger} owns it).']
ASK_ACCOUNT = ['You have two checking accounts: {ids}. Which account id should I take the money from?',
               'Which checking account do you mean, {ids}? Please give me the account id.',
               'I see checking accounts {ids}. Which account id is the source?',
               'There are two checking accounts, {ids}; which account id should I use?']
PERSONAS = ('polite', 'terse', 'chatty', 'impatient')


class BankTools:
  def __init__(self, db: dict[str, Any]):
    self.db = db

  def _account(self, account_id: str) -> dict:
    if account_id not in self.db['accounts']:
      raise KeyError(f'no account {account_id}')
    return self.db['accounts'][account_id]

  def list_accounts(self) -> list:
    """Lists the customer's accounts: id, type and balance."""
    return [{'account_id': i, 'type': a['type'], 'balance': a['balance']}
            for i, a in sorted(self.db['accounts'].items()) if a['owner'] == self.db['customer']]

  def get_balance(self, account_id: str) -> dict:
    """Returns an account's balance."""
    return {'account_id': account_id, 'balance': self._account(account_id)['balance']}

  def transfer(self, from_account: str, to_account: str, amount: int) -> dict:
    """Moves an amount (whole currency units) from one account to another."""
    source, target = self._account(from_account), self._account(to_account)
    if amount > source['balance']:
      raise ValueError(f'insufficient funds in {from_account}')
    source['balance'] -= amount
    target['balance'] += amount
    self.db['transfers'].append({'from': from_account, 'to': to_account, 'amount': amount})
    return {'from_balance': source['balance'], 'to_balance': target['balance']}

  def block_card(self, card_id: str) -> dict:
    """Blocks a card."""
    if card_id not in self.db['cards']:
      raise KeyError(f'no card {card_id}')
    self.db['cards'][card_id]['blocked'] = True
    return {'card_id': card_id, 'blocked': True}


class Bank(Domain):
  name = 'bank'
  policy = POLICY

  def tools(self, db: dict[str, Any]) -> dict[str, Tool]:
    t = BankTools(db)
    account = {'pattern': '^AC[0-9]+$', 'description': 'account id, e.g. AC12345'}
    return {tool.name: tool for tool in (
        make_tool(t.list_accounts), make_tool(t.get_balance, account_id=account),
        make_tool(t.transfer, from_account=account, to_account=account, amount={'minimum': 1}),
        make_tool(t.block_card, card_id={'pattern': '^CD[0-9]+$', 'description': 'card id, e.g. CD1234'}))}

  def sample_task(self, rng: random.Random, split: str, index: int) -> Task:
    customer = draw_name(rng, CUSTOMERS, split)
    numbers = set()
    while len(numbers) < 5:  # four of the customer's accounts and a stranger's, all distinct
      numbers.add(draw_id(rng, split))
    *ids, stranger_id = [f'AC{n}' for n in sorted(numbers, key=lambda _: rng.random())]
    types = ['checking', 'checking', 'savings', 'travel']
    accounts = {i: {'owner': customer, 'type': kind, 'balance': draw_id(rng, split, 4)} for i, kind in zip(ids, types)}
    accounts[stranger_id] = {'owner': draw_name(rng, STRANGERS, split), 'type': 'checking', 'balance': draw_id(rng, split, 4)}
    card = f'CD{draw_id(rng, split, 4)}'
    db = {'customer': customer, 'accounts': accounts, 'cards': {card: {'account': ids[0], 'blocked': False}},
          'transfers': []}
    amount = rng.randrange(10, 500)
    common = dict(domain=self.name, task_id=f'{self.name}-{split}-{index}-{rng.randrange(10 ** 6)}', split=split,
                  persona=rng.choice(PERSONAS), initial_db=db, entities=(customer, *ids, card))
    kind = rng.choice(['balance', 'move', 'block', 'ask', 'refuse'])
    if kind == 'balance':
      account = rng.choice(ids)
      balance = str(accounts[account]['balance'])
      return Task(kind='act', instruction=draw(rng, BALANCE, split).format(type=accounts[account]['type'],
                                                                          account=account),
                  gold_actions=(ToolCall('get_balance', {'account_id': account}),), required_facts=(balance,),
                  expert_final=f'Account {account} holds {balance}.', **common)
    if kind == 'move':
      src, dst = rng.sample(ids, 2)
      return Task(kind='act', instruction=draw(rng, MOVE, split).format(
          amount=amount, src=src, dst=dst, src_type=accounts[src]['type'], dst_type=accounts[dst]['type']),
                  gold_actions=(ToolCall('transfer', {'from_account': src, 'to_account': dst, 'amount': amount}),),
                  expert_final=f'Done: {amount} moved from {src} to {dst}.', **common)
    if kind == 'block':
      return Task(kind='act', instruction=draw(rng, BLOCK, split).format(card=card),
                  gold_actions=(ToolCall('block_card', {'card_id': card}),),
                  expert_final=f'Card {card} is blocked now.', **common)
    if kind == 'ask':
      src, dst = ids[rng.randrange(2)], rng.choice(ids[2:])
      fact = Fact('account', src, ('which', 'account id'), f'Take it from {src}.')
      return Task(kind='ask', instruction=draw(rng, ASK_MOVE, split).format(
          amount=amount, dst=dst, dst_type=accounts[dst]['type']), facts=(fact,), withheld=('account',),
                  gold_actions=(ToolCall('list_accounts', {}),
                                ToolCall('transfer', {'from_account': src, 'to_account': dst, 'amount': amount})),
                  expert_ask=draw(rng, ASK_ACCOUNT, split).format(ids=' and '.join(ids[:2])), ask_after=1,
                  expert_final=f'Moved {amount} from {src} to {dst}.', **common)
    src = rng.choice(ids)
    return Task(kind='refuse', instruction=draw(rng, STRANGER_MOVE, split).format(
        amount=amount, src=src, dst=stranger_id, stranger=accounts[stranger_id]['owner']),
                gold_actions=(), forbidden_actions=(
                    ToolCall('transfer', {'from_account': src, 'to_account': stranger_id, 'amount': amount}),),
                expert_final=f'Sorry, I cannot send money to {stranger_id}: I can only move money between your own '
                             'accounts.', **common)
