#!/usr/bin/env python3
"""Scale curve: encrypt and decrypt against `cp -r` by size and by file count.

Bytes: SavedModel-shaped directories of 64 MiB, 256 MiB, 1 GiB and 4 GiB
(4 variable shards plus the small files, as benchmarks/run.py makes them).
Files: the same 256 MiB as 1 file and as 1,000 files. Default settings
(BLAKE3), outputs on /dev/shm, page cache warm; each size is measured in
interleaved rounds (cp -r, encrypt, decrypt, then the next round) and every
ratio is to the `cp -r` of the same round: median and min-max over rounds.

    .venv/bin/python benchmarks/scale.py                  # 5 rounds
    .venv/bin/python benchmarks/scale.py --sizes 64,256 --rounds 5

Writes bench-out/scale.json and docs/scale.png (the plot BENCHMARKS.md
shows; drawn with Pillow, or an SVG without it), and prints the Markdown
tables. The 4 GiB point needs about 12 GiB
free on /dev/shm (the cp copy is removed before encrypting; the package and
its decryption coexist) and as much free memory; without it the point is
skipped and the output says so.
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import tfx_encrypt as te  # noqa: E402  pylint: disable=g-import-not-at-top
from benchmarks import run as bench  # noqa: E402  pylint: disable=g-import-not-at-top
from tfx_encrypt.keys import local  # noqa: E402  pylint: disable=g-import-not-at-top

MiB = 1 << 20
SIZES = (64, 256, 1024, 4096)
FILES = (1, 1000)
FILES_MIB = 256
OPS = ('cp', 'encrypt', 'decrypt')


def make_many(path, total_mib, count):
  """`count` files of equal size (total_mib in all): `saved_model.pb` (so
  that it passes for a model), the rest in 10 directories."""
  shutil.rmtree(path, ignore_errors=True)
  os.makedirs(path)
  size = total_mib * MiB // count
  for i in range(count):
    d = os.path.join(path, 'variables', f'd{i % 10}')
    os.makedirs(d, exist_ok=True)
    name = (os.path.join(path, 'saved_model.pb') if i == 0 else
            os.path.join(d, f'part-{i:05d}'))
    with open(name, 'wb') as f:
      left = size
      while left:
        n = min(left, 8 * MiB)
        f.write(os.urandom(n))
        left -= n


def _avail(path):
  st = os.statvfs(path)
  return st.f_bavail * st.f_frsize


def _mem_available():
  with open('/proc/meminfo') as f:
    for line in f:
      if line.startswith('MemAvailable:'):
        return int(line.split()[1]) * 1024
  return 0


def evict_others(out, keep):
  """Drop our other inputs from the page cache (POSIX_FADV_DONTNEED).

  At 4 GiB a round holds the package and its decryption on /dev/shm beside
  the warm input: 12 GiB. Without free memory the kernel reclaims page
  cache while a command allocates, and whichever command runs then pays
  for it (cp -r of a package once took 11.7 s instead of 3.9 s). Only this
  benchmark's own files in `out` are dropped, never anyone else's.
  """
  keep = os.path.abspath(keep)
  for root, _, files in os.walk(out):
    here = os.path.abspath(root)
    if here == keep or here.startswith(keep + os.sep):
      continue
    for name in files:
      try:
        fd = os.open(os.path.join(root, name), os.O_RDONLY)
      except OSError:
        continue
      try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
      finally:
        os.close(fd)


def _file_count(path):
  return sum(len(files) for _, _, files in os.walk(path))


def _drop_from_cache(path):
  for root, _, files in os.walk(path):
    for name in files:
      fd = os.open(os.path.join(root, name), os.O_RDONLY)
      try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
      finally:
        os.close(fd)


def _mem_free():
  with open('/proc/meminfo') as f:
    for line in f:
      if line.startswith('MemFree:'):
        return int(line.split()[1]) * 1024
  return 0


def measure(model, scratch, key_pub, key, rounds, log):
  """Interleaved rounds of cp -r, encrypt, decrypt; per-round ratios to cp.

  Every command starts with room for its output in free memory: decrypt is
  the only one that needs two copies on /dev/shm at once (the package and
  its output), so at 4 GiB, when free memory runs short, the warm input
  (which decrypt does not read) is dropped from the page cache first and
  read back before the next round. Otherwise the kernel would reclaim
  while decrypt allocates: 1.9-2.4 s instead of 1.5 s for 4 GiB here,
  with 6 GiB still free (reclaim starts long before memory runs out).
  """
  p = lambda n: os.path.join(scratch, n)  # noqa: E731
  secs = {op: [] for op in OPS}
  evict_others(os.path.dirname(model), model)
  size = sum(os.path.getsize(os.path.join(r, f))
             for r, _, files in os.walk(model) for f in files)
  for r in range(rounds):
    print(f'  round {r + 1}/{rounds}', file=log)
    bench.rm(p('cp'), p('pkg'), p('dec'))
    bench.warm(model)
    secs['cp'].append(bench.timed(lambda: subprocess.run(
        ['cp', '-r', model, p('cp')], check=True)))
    bench.rm(p('cp'))
    secs['encrypt'].append(bench.timed(lambda: te.encrypt_model(
        model, p('pkg'), recipients=[key_pub])))
    if _mem_free() < 2 * size + (2 << 30):  # reclaim starts early here
      _drop_from_cache(model)
    secs['decrypt'].append(bench.timed(lambda: te.decrypt_model(
        p('pkg'), p('dec'), identities=[key], allow_unsigned=True)))
    bench.rm(p('pkg'), p('dec'))
  out = {}
  for op in OPS:
    ratios = [a / b for a, b in zip(secs[op], secs['cp'])]
    out[op] = {'seconds': secs[op],
               'median_s': statistics.median(secs[op]),
               'ratio_median': statistics.median(ratios),
               'ratio_min': min(ratios), 'ratio_max': max(ratios)}
  return out


class _SvgCanvas:
  """Just enough of a drawing surface for the plot, as SVG."""

  def __init__(self, w, h):
    self.items = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" '
                  f'height="{h}" font-family="sans-serif" font-size="12">',
                  f'<rect width="{w}" height="{h}" fill="white"/>']

  def line(self, x1, y1, x2, y2, color, width=1, dash=False):
    d = ' stroke-dasharray="5,4"' if dash else ''
    self.items.append(f'<line x1="{x1:.1f}" y1="{y1:.1f}" x2="{x2:.1f}" '
                      f'y2="{y2:.1f}" stroke="{color}" stroke-width="{width}"'
                      f'{d}/>')

  def polyline(self, pts, color, width=1.5):
    p = ' '.join(f'{x:.1f},{y:.1f}' for x, y in pts)
    self.items.append(f'<polyline points="{p}" fill="none" stroke="{color}" '
                      f'stroke-width="{width}"/>')

  def circle(self, x, y, r, color):
    self.items.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="{r}" '
                      f'fill="{color}"/>')

  def rect(self, x, y, w, h, fill=None, outline=None):
    self.items.append(f'<rect x="{x}" y="{y}" width="{w}" height="{h}" '
                      f'fill="{fill or "none"}" stroke="{outline or "none"}"/>')

  def text(self, x, y, s, anchor='start', color='black', bold=False,
           vertical=False):
    a = {'start': 'start', 'middle': 'middle', 'end': 'end'}[anchor]
    extra = ' font-weight="bold"' if bold else ''
    if vertical:
      extra += f' transform="rotate(-90 {x} {y})"'
    s = s.replace('&', '&amp;').replace('<', '&lt;')
    self.items.append(f'<text x="{x:.1f}" y="{y + 4:.1f}" text-anchor="{a}" '
                      f'fill="{color}"{extra}>{s}</text>')

  def save(self, path):
    with open(path, 'w') as f:
      f.write('\n'.join(self.items + ['</svg>']) + '\n')


class _PngCanvas:
  """The same surface drawn with Pillow (in the venv), 2x for crispness."""

  def __init__(self, w, h):
    from PIL import Image, ImageDraw, ImageFont  # pylint: disable=g-import-not-at-top
    self._k = 2
    self._image_mod = Image
    self.img = Image.new('RGB', (w * self._k, h * self._k), 'white')
    self.draw = ImageDraw.Draw(self.img)
    self.font = ImageFont.load_default(size=12 * self._k)
    self.bold = self.font

  def _s(self, *v):
    return [x * self._k for x in v]

  def line(self, x1, y1, x2, y2, color, width=1, dash=False):
    if not dash:
      self.draw.line(self._s(x1, y1, x2, y2), fill=color,
                     width=max(1, int(width * self._k)))
      return
    import math  # pylint: disable=g-import-not-at-top
    length = math.hypot(x2 - x1, y2 - y1)
    n = int(length // 9) + 1
    for i in range(n):
      a, b = i * 9 / length, min(1.0, (i * 9 + 5) / length)
      self.draw.line(self._s(x1 + (x2 - x1) * a, y1 + (y2 - y1) * a,
                             x1 + (x2 - x1) * b, y1 + (y2 - y1) * b),
                     fill=color, width=max(1, int(width * self._k)))

  def polyline(self, pts, color, width=1.5):
    flat = [c for x, y in pts for c in self._s(x, y)]
    if len(pts) > 1:
      self.draw.line(flat, fill=color, width=max(1, int(width * self._k)))

  def circle(self, x, y, r, color):
    x, y, r = self._s(x, y, r)
    self.draw.ellipse([x - r, y - r, x + r, y + r], fill=color)

  def rect(self, x, y, w, h, fill=None, outline=None):
    x, y, w, h = self._s(x, y, w, h)
    self.draw.rectangle([x, y, x + w, y + h], fill=fill, outline=outline,
                        width=self._k)

  def text(self, x, y, s, anchor='start', color='black', bold=False,
           vertical=False):
    del bold  # one font
    x, y = self._s(x, y)
    a = {'start': 'l', 'middle': 'm', 'end': 'r'}[anchor] + 'm'
    if not vertical:
      self.draw.text((x, y), s, fill=color, font=self.font, anchor=a)
      return
    box = self.draw.textbbox((0, 0), s, font=self.font)
    tw, th = box[2] - box[0] + 4, box[3] - box[1] + 4
    tile = self._image_mod.new('RGB', (tw, th), 'white')
    from PIL import ImageDraw  # pylint: disable=g-import-not-at-top
    ImageDraw.Draw(tile).text((2, 2 - box[1]), s, fill=color, font=self.font)
    tile = tile.rotate(90, expand=True)
    self.img.paste(tile, (int(x - tile.width / 2), int(y - tile.height / 2)))

  def save(self, path):
    self.img.save(path, optimize=True)


def plot(res, path):
  """Two panels: seconds per size (log-log) and ratio to cp -r per size.

  A PNG (Pillow, in the venv) or, for a path ending in .svg or without
  Pillow, an SVG.
  """
  import math  # pylint: disable=g-import-not-at-top
  pts = [(s['mib'], s['ops']) for s in res['sizes'] if not s.get('skipped')]
  if not pts:
    return None
  colors = {'cp': '#777777', 'encrypt': '#d95f02', 'decrypt': '#1b9e77'}
  w, h, pad = 860, 400, 60
  pw = (w - 3 * pad) // 2
  ph = h - 2 * pad - 30
  if not path.endswith('.svg'):
    try:
      c = _PngCanvas(w, h)
    except ImportError:
      path = os.path.splitext(path)[0] + '.svg'
      c = _SvgCanvas(w, h)
  else:
    c = _SvgCanvas(w, h)
  xs = [math.log2(m) for m, _ in pts]
  x0, x1 = min(xs) - 0.4, max(xs) + 0.4
  ys = [v['median_s'] for _, ops in pts for v in ops.values()]
  y0, y1 = math.log10(min(ys)) - 0.15, math.log10(max(ys)) + 0.15
  rmax = max(max(v['ratio_max'] for v in ops.values()) for _, ops in pts)
  rmax = max(1.5, math.ceil(rmax * 4) / 4)
  fx = lambda m: (math.log2(m) - x0) / (x1 - x0) * pw  # noqa: E731

  def panel(ox, title, ylab, fy, yticks):
    c.text(ox + pw / 2, pad - 22, title, 'middle', bold=True)
    for v, label in yticks:
      c.line(ox, fy(v), ox + pw, fy(v), '#dddddd')
      c.text(ox - 5, fy(v), label, 'end')
    c.rect(ox, pad, pw, ph, outline='black')
    for m, _ in pts:
      x = ox + fx(m)
      c.line(x, pad + ph, x, pad + ph + 5, 'black')
      c.text(x, pad + ph + 16, f'{m // 1024} GiB' if m >= 1024 else
             f'{m} MiB', 'middle')
    c.text(ox - 42, pad + ph / 2, ylab, 'middle', vertical=True)

  fy1 = lambda v: pad + ph - (math.log10(v) - y0) / (y1 - y0) * ph  # noqa: E731
  ticks = [t for t in (0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 50)
           if y0 <= math.log10(t) <= y1]
  panel(pad, 'Seconds (median), log-log', 'seconds', fy1,
        [(t, f'{t:g}') for t in ticks])
  ox2 = 2 * pad + pw
  fy2 = lambda v: pad + ph - v / rmax * ph  # noqa: E731
  panel(ox2, 'Ratio to cp -r of the same round (median, min-max)',
        'x cp -r', fy2,
        [(t / 4, f'{t / 4:g}') for t in range(0, int(rmax * 4) + 1, 2)])
  c.line(ox2, fy2(1.3), ox2 + pw, fy2(1.3), '#cc0000', dash=True)
  c.text(ox2 + pw - 4, fy2(1.3) - 9, 'goal 1.3x', 'end', color='#cc0000')
  nudge = {'cp': 0, 'encrypt': -5, 'decrypt': 5}  # bars side by side
  for op, color in colors.items():
    line1, line2 = [], []
    for m, ops in pts:
      v = ops[op]
      p1 = (pad + fx(m), fy1(v['median_s']))
      p2 = (ox2 + fx(m) + nudge[op], fy2(v['ratio_median']))
      line1.append(p1)
      line2.append(p2)
      c.circle(*p1, 3, color)
      c.line(p2[0], fy2(v['ratio_min']), p2[0], fy2(v['ratio_max']), color,
             width=2)
      c.circle(*p2, 3, color)
    c.polyline(line1, color)
    c.polyline(line2, color)
  for i, (op, color) in enumerate(colors.items()):
    x = pad + i * 140
    c.rect(x, h - 44, 12, 12, fill=color)
    c.text(x + 17, h - 38, 'cp -r' if op == 'cp' else f'{op} (default)')
  c.text(pad, h - 16, res['note'], color='#555555')
  c.save(path)
  return path


def _ratio(o):
  return (f'{o["ratio_median"]:.2f} '
          f'[{o["ratio_min"]:.2f}–{o["ratio_max"]:.2f}]')


def tables(res) -> str:
  lines = [res['note'], '',
           '| size | cp -r s | encrypt s | × cp -r | decrypt s | × cp -r | '
           'encrypt s/GiB | decrypt s/GiB |',
           '|---:|---:|---:|---:|---:|---:|---:|---:|']
  for s in res['sizes']:
    label = f'{s["mib"] // 1024} GiB' if s['mib'] >= 1024 else f'{s["mib"]} MiB'
    if s.get('skipped'):
      lines.append(f'| {label} | skipped: {s["skipped"]} ||||||')
      continue
    o = s['ops']
    gib = s['mib'] / 1024
    lines.append(
        f'| {label} | {o["cp"]["median_s"]:.3f} | '
        f'{o["encrypt"]["median_s"]:.3f} | {_ratio(o["encrypt"])} | '
        f'{o["decrypt"]["median_s"]:.3f} | {_ratio(o["decrypt"])} | '
        f'{o["encrypt"]["median_s"] / gib:.3f} | '
        f'{o["decrypt"]["median_s"] / gib:.3f} |')
  lines += ['', f'| {FILES_MIB} MiB as | cp -r s | encrypt s | × cp -r | '
            'decrypt s | × cp -r |', '|---:|---:|---:|---:|---:|---:|']
  for s in res['files']:
    o = s['ops']
    lines.append(
        f'| {s["count"]} files | {o["cp"]["median_s"]:.3f} | '
        f'{o["encrypt"]["median_s"]:.3f} | {_ratio(o["encrypt"])} | '
        f'{o["decrypt"]["median_s"]:.3f} | {_ratio(o["decrypt"])} |')
  if len(res['files']) == 2:
    a, b = res['files']
    n = b['count'] - a['count']
    per = {op: (b['ops'][op]['median_s'] - a['ops'][op]['median_s']) / n * 1e3
           for op in OPS}
    lines += ['', f'Cost of one more file (from {a["count"]} to {b["count"]} '
              f'files, same bytes): cp -r {per["cp"]:.3f} ms, encrypt '
              f'{per["encrypt"]:.3f} ms, decrypt {per["decrypt"]:.3f} ms.']
  return '\n'.join(lines)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  ap.add_argument('--sizes', default=','.join(str(s) for s in SIZES),
                  help='MiB, comma-separated')
  ap.add_argument('--files', default=','.join(str(f) for f in FILES),
                  help=f'file counts for the {FILES_MIB} MiB model')
  ap.add_argument('--rounds', type=int, default=5)
  ap.add_argument('--out', default=os.path.join(ROOT, 'bench-out'))
  ap.add_argument('--scratch', default='/dev/shm')
  ap.add_argument('--plot', default=os.path.join(ROOT, 'docs', 'scale.png'),
                  help='where to draw the plot (.png, or .svg)')
  args = ap.parse_args(argv)
  log = sys.stderr
  out = os.path.abspath(args.out)
  os.makedirs(out, exist_ok=True)
  keys = os.path.join(out, 'keys')
  os.makedirs(keys, exist_ok=True)
  if not os.path.exists(os.path.join(keys, 'x.pub.pem')):
    local.keygen('x25519', os.path.join(keys, 'x'))
  pub, key = os.path.join(keys, 'x.pub.pem'), os.path.join(keys, 'x.key.pem')
  scratch = os.path.join(args.scratch, f'tfxe-scale-{os.getpid()}')
  os.makedirs(scratch)
  t_start = time.time()
  with open('/proc/loadavg') as f:
    load_before = f.read().split()[:3]
  res = {'rounds': args.rounds, 'scratch': args.scratch, 'sizes': [],
         'files': [], 'cpus': os.cpu_count(), 'loadavg_before': load_before}
  try:
    for mib in (int(s) for s in args.sizes.split(',') if s):
      model = os.path.join(out, f'model-{mib}m-4s')
      marker = os.path.join(out, f'.model-{mib}-4')
      need = 3 * mib * MiB + 256 * MiB
      if _avail(args.scratch) < need or _mem_available() < need + mib * MiB:
        why = (f'needs {need / 2**30:.1f} GiB free on {args.scratch} and '
               f'{(need + mib * MiB) / 2**30:.1f} GiB of free memory; have '
               f'{_avail(args.scratch) / 2**30:.1f} and '
               f'{_mem_available() / 2**30:.1f}')
        print(f'{mib} MiB: skipped, {why}', file=log)
        res['sizes'].append({'mib': mib, 'skipped': why})
        continue
      if not os.path.exists(marker):
        bench.rm(model)
        print(f'making the {mib} MiB model', file=log)
        bench.make_model(model, mib, 4)
        open(marker, 'w').close()
      print(f'{mib} MiB, {_file_count(model)} files', file=log)
      res['sizes'].append({'mib': mib, 'files': _file_count(model),
                           'ops': measure(model, scratch, pub, key,
                                          args.rounds, log)})
    for count in (int(c) for c in args.files.split(',') if c):
      model = os.path.join(out, f'model-{FILES_MIB}m-{count}f')
      marker = os.path.join(out, f'.model-{FILES_MIB}-{count}f')
      if not os.path.exists(marker):
        print(f'making the {count}-file model', file=log)
        make_many(model, FILES_MIB, count)
        open(marker, 'w').close()
      n = _file_count(model)
      print(f'{FILES_MIB} MiB in {n} files', file=log)
      res['files'].append({'count': n, 'ops': measure(
          model, scratch, pub, key, args.rounds, log)})
  finally:
    shutil.rmtree(scratch, ignore_errors=True)
  with open('/proc/loadavg') as f:
    res['loadavg_after'] = f.read().split()[:3]
  res['seconds_total'] = time.time() - t_start
  res['note'] = (f'{args.rounds} interleaved rounds, outputs on '
                 f'{args.scratch}, {os.cpu_count()} CPUs, load average '
                 f'{res["loadavg_before"][0]} before / '
                 f'{res["loadavg_after"][0]} after')
  with open(os.path.join(out, 'scale.json'), 'w') as f:
    json.dump(res, f, indent=2)
  drawn = plot(res, args.plot) if args.plot else None
  print(tables(res))
  print(f'\n(plot: {drawn}; {res["seconds_total"]:.0f} s)')
  return 0


if __name__ == '__main__':
  sys.exit(main())
