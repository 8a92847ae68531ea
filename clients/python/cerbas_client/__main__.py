"""``python -m cerbas_client``: what the original's cerbastest.py did (hello, slow,
then halt the server), against the server the environment names. Not a test."""

from . import Client, TimeoutError

c = Client(user="foo", source="cerbastest")
print(c.request("hello"))
print(c.request("hello", msgpack=True))
try:
    print(c.request("slow"))  # the server answers "timeout" after 5 s
except TimeoutError as e:
    print("client timeout:", e)
print(c.request("halt", {"delay": 1000}))
c.close()
