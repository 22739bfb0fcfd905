"""Steering by neurons, under its public name: ``lsa.steering`` is the module :mod:`lsa.neurons.steering`.

It lives in :mod:`lsa.neurons`, next to the statistics and neuron sets it builds on and the study that
uses it (:func:`lsa.neurons.language_report`); importing ``lsa.steering`` gives that same module
object, so its names, and anything set on them, are one.
"""

import sys

from lsa.neurons import steering

sys.modules[__name__] = steering
