"""Helpers shared by the bench scripts; imports nothing heavy (no JAX), so any process may use it."""

import os
import platform


def cpu_info() -> tuple[str, list[str]]:
  """The CPU model string and its AVX-512 / AMX feature flags, from /proc/cpuinfo."""
  model, isa = None, []
  try:
    with open('/proc/cpuinfo') as f:
      for line in f:
        key, _, value = line.partition(':')
        if key.strip() == 'model name' and model is None:
          model = value.strip()
        elif key.strip() == 'flags':
          isa = sorted(f for f in value.split() if f.startswith(('avx512', 'amx')))
          break
  except OSError:
    pass
  return model or platform.processor(), isa


def machine() -> dict:
  """CPU model, ISA flags, core count and load average, for a benchmark's record."""
  model, isa = cpu_info()
  return {'cpu': model, 'isa': isa, 'cores': os.cpu_count(), 'loadavg_start': os.getloadavg()}
