"""Prints the score of a `make mutate` run (run in its scratch directory).

Reads mutmut 2.x's cache (.mutmut-cache, SQLite): per module, how many
mutants were killed, survived, timed out or were skipped; then every
surviving or timed-out mutant as a diff (`mutmut show ID`). See
docs/TESTING.md.
"""

import collections
import os
import sqlite3
import subprocess

NAMES = {'ok_killed': 'killed', 'bad_survived': 'survived',
         'bad_timeout': 'timeout', 'ok_suspicious': 'killed slowly',
         'skipped': 'skipped', 'untested': 'untested'}


def main():
  db = sqlite3.connect('.mutmut-cache')
  rows = db.execute('SELECT m.id, m.status, f.filename FROM Mutant m '
                    'JOIN Line l ON m.line = l.id '
                    'JOIN SourceFile f ON l.sourcefile = f.id ORDER BY m.id')
  score = collections.defaultdict(collections.Counter)
  survivors = []
  for mid, status, name in rows:
    score[name][status] += 1
    if status in ('bad_survived', 'bad_timeout'):
      survivors.append((mid, status))
  print('\nmutation score per module (skipped: outside the scope, or only '
        'message text; score: killed and timed out / tested)')
  for f in sorted(score):
    c = score[f]
    tested = sum(v for k, v in c.items() if k not in ('skipped', 'untested'))
    parts = ', '.join(f'{NAMES.get(k, k)} {v}' for k, v in sorted(c.items()))
    pct = (f'{100 * (tested - c["bad_survived"]) / tested:.1f}%' if tested
           else '-')
    print(f'  {f}: {parts}; score {pct}')
  for mid, status in survivors:
    print(f'\n--- {NAMES[status]}: mutant {mid}')
    print(subprocess.run([os.environ.get('MUTMUT', 'mutmut'), 'show',
                          str(mid)], capture_output=True, text=True,
                         check=False).stdout.rstrip())


if __name__ == '__main__':
  main()
