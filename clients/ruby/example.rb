# frozen_string_literal: true

# What the original's test client (cerbastest.py) did: hello, hello as msgpack,
# slow (the server answers "timeout" after 5 s), then halt the server.
#
# Run against a server found as the server finds Redis (CERBAS_REDIS_URL,
# CERBAS_ENV):
#
#   ruby clients/ruby/example.rb
#
# Note: the last call stops that server, one second later.

require_relative "lib/cerbas_client"

CerbasClient::Client.open(user: "foo", source: "cerbastest") do |c|
  p c.request("hello")
  p c.request("hello", msgpack: true)
  begin
    p c.request("slow") # {"status"=>"error", "data"=>"timeout"}
  rescue CerbasClient::TimeoutError => e
    puts "client timeout: #{e.message}"
  end
  p c.request("halt", { "delay" => 1000 })
end
