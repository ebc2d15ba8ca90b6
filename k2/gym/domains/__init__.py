"""The embedded offline domains, by name: retail orders, calendar, files, calculator, and bank (left out of the
embedded synthesis: the agent evaluation's domain never seen in SFT)."""

from k2.gym.domains.bank import Bank
from k2.gym.domains.calculator import Calculator
from k2.gym.domains.calendar import Calendar
from k2.gym.domains.files import Files
from k2.gym.domains.retail import Retail

DOMAINS = {domain.name: domain for domain in (Retail(), Calendar(), Files(), Calculator(), Bank())}


def get(name: str):
  if name not in DOMAINS:
    raise KeyError(f'unknown domain {name!r}; known: {", ".join(DOMAINS)}')
  return DOMAINS[name]
