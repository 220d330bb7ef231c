"""``python -m plugins.kvm URI``: connect to libvirtd once, print what it said as JSON, exit.

The child :mod:`plugins.kvm.liveness` asks, so that an agent with no VMs never loads libvirt.
"""

import json
import sys

from plugins.kvm.host import ask_libvirtd

print(json.dumps(ask_libvirtd(sys.argv[1])))
