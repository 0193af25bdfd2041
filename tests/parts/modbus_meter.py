"""A Modbus TCP server for sluice's meter tests: pymodbus (from PyPI), the
server side a site's revenue meter or smart PDU would be.

Usage: python3 modbus_meter.py PORT

Serves unit 1 on 127.0.0.1:PORT, holding and input registers 0..999, all 0
at start; the test writes the figures it wants read (function 16) as the
simulated hall changes. Bounded: exits after 10 minutes, or as soon as the
process that started it is gone.
"""

import asyncio
import os
import sys

from pymodbus.datastore import ModbusDeviceContext, ModbusSequentialDataBlock, ModbusServerContext
from pymodbus.server import StartAsyncTcpServer


async def watchdog(parent: int) -> None:
    for _ in range(6000):
        if os.getppid() != parent:
            os._exit(0)
        await asyncio.sleep(0.1)
    os._exit(0)


async def main() -> None:
    port = int(sys.argv[1])
    # pymodbus blocks start at 1 (it maps wire address N to block address N + 1).
    device = ModbusDeviceContext(
        hr=ModbusSequentialDataBlock(1, [0] * 1000),
        ir=ModbusSequentialDataBlock(1, [0] * 1000),
    )
    context = ModbusServerContext(devices=device, single=True)
    asyncio.get_running_loop().create_task(watchdog(os.getppid()))
    await StartAsyncTcpServer(context=context, address=("127.0.0.1", port))


asyncio.run(main())
