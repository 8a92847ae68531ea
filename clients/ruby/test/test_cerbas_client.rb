# frozen_string_literal: true

# End-to-end tests of cerbas_client against a real redis-server and the cerbas
# binary (the example functions of src/functions.rs, configured by cerbas.toml).
#
# Needs /usr/bin/redis-server (or REDIS_SERVER) and a built server (`cargo build`;
# or CERBAS_BIN). Run from clients/ruby:
#
#   ruby -Ilib -Itest test/test_cerbas_client.rb
#
# The servers start once, on the first test that needs them, and stop after the
# run (Minitest.after_run). The tests of URL/db resolution need no server.

require "minitest/autorun"
require "cerbas_client"
require "redis"
require "rbconfig"
require "securerandom"
require "socket"
require "tmpdir"
require "fileutils"

module CerbasTest
  HERE = __dir__
  RUBY_DIR = File.expand_path("..", HERE)
  REPO = File.expand_path("../../..", HERE)
  CERBAS_BIN = ENV.fetch("CERBAS_BIN", "").then { |b| b.empty? ? File.join(REPO, "target", "debug", "cerbas") : b }
  REDIS_SERVER = ENV.fetch("REDIS_SERVER", "").then { |b| b.empty? ? "/usr/bin/redis-server" : b }
  CONFIG = File.join(REPO, "cerbas.toml")

  def self.now = Process.clock_gettime(Process::CLOCK_MONOTONIC)

  # A directory for the servers' logs, removed after the run.
  def self.tmpdir
    @tmpdir ||= Dir.mktmpdir("cerbas-ruby-test").tap do |dir|
      Minitest.after_run { FileUtils.remove_entry(dir, true) }
    end
  end

  def self.free_port
    server = TCPServer.new("127.0.0.1", 0)
    server.addr[1]
  ensure
    server&.close
  end

  def self.log_tail(path, lines = 40)
    File.readlines(path, chomp: false).last(lines).join
  rescue SystemCallError
    "(no log)"
  end

  # A child process we started, with its output in a log file.
  class Child
    attr_reader :pid, :log, :status

    def initialize(argv, log:, env: {}, chdir: REPO)
      @log = log
      @pid = Process.spawn(env, *argv, in: File::NULL, out: log, err: %i[child out], chdir: chdir)
    end

    def alive?
      return false if @status

      _, @status = Process.wait2(pid, Process::WNOHANG)
      @status.nil?
    end

    # Waits up to +seconds+ for it to exit; its Process::Status, or nil.
    def wait(seconds)
      deadline = CerbasTest.now + seconds
      while alive?
        return nil if CerbasTest.now > deadline

        sleep 0.02 # poll interval, bounded by the deadline
      end
      @status
    end

    # SIGTERM, then SIGKILL if it does not exit within +grace+ seconds.
    def stop(grace = 10.0)
      return @status unless alive?

      Process.kill("TERM", pid)
      return @status if wait(grace)

      Process.kill("KILL", pid)
      _, @status = Process.wait2(pid)
      @status
    rescue Errno::ESRCH, Errno::ECHILD
      @status
    end

    # Sends +signal+ and waits for it to exit.
    def kill(signal)
      Process.kill(signal, pid)
      _, @status = Process.wait2(pid)
      @status
    rescue Errno::ESRCH, Errno::ECHILD
      @status
    end

    def tail = CerbasTest.log_tail(log)
  end

  # redis-server on a free port of 127.0.0.1, without persistence.
  class RedisServer
    attr_reader :port, :url

    # +args+: more redis-server arguments; +password+: its requirepass.
    def initialize(dir = CerbasTest.tmpdir, args: [], password: nil)
      @dir = dir
      @args = args
      @password = password
      @args += ["--requirepass", password] if password
      attempts = 0
      begin
        attempts += 1
        @port = CerbasTest.free_port
        @url = "redis://127.0.0.1:#{port}"
        start
      rescue RuntimeError
        exited = @child && !@child.alive? # e.g. the port was taken meanwhile
        stop
        retry if exited && attempts < 3
        raise
      end
    end

    def stop = @child&.stop

    # Stops it (SIGTERM, or +signal+) and starts a new one on the same port: an
    # empty Redis with another run_id (what a restart without persistence, or
    # from an old dump, looks like).
    def restart(signal = nil)
      signal ? @child.kill(signal) : stop
      start
    end

    # SIGSTOP / SIGCONT: a frozen Redis keeps its connections and answers nothing.
    def pause = Process.kill("STOP", @child.pid)
    def resume = Process.kill("CONT", @child.pid)

    # A plain redis gem connection to db +db+, closed after the block.
    def with_redis(db: 1)
      redis = Redis.new(url: url, db: db, timeout: 5.0, password: @password)
      yield redis
    ensure
      redis&.close
    end

    # The field +name+ of INFO +section+, as a String.
    def info_field(section, name)
      with_redis { |r| r.info(section).fetch(name) }
    end

    private

    def start
      @child = Child.new([REDIS_SERVER, "--port", port.to_s, "--bind", "127.0.0.1",
                          "--save", "", "--appendonly", "no", "--dir", @dir, *@args],
                         log: File.join(@dir, "redis-#{port}.log"), chdir: @dir)
      wait_ready(CerbasTest.now + 10.0)
    end

    def wait_ready(deadline)
      redis = Redis.new(host: "127.0.0.1", port: port, timeout: 1.0, reconnect_attempts: 0, password: @password)
      loop do
        raise "redis-server exited with #{@child.status}:\n#{@child.tail}" unless @child.alive?

        begin
          return if redis.ping == "PONG"
        rescue Redis::BaseConnectionError
          nil # not listening yet
        end
        raise "redis-server did not answer PING in time:\n#{@child.tail}" if CerbasTest.now > deadline

        sleep 0.02 # poll interval, bounded by the deadline
      end
    ensure
      redis&.close
    end
  end

  # The cerbas binary, serving the Redis at +redis_url+ with the shipped config.
  class CerbasServer
    attr_reader :redis_url, :child

    def initialize(redis_url, dir = CerbasTest.tmpdir)
      raise "no cerbas binary at #{CERBAS_BIN}: run `cargo build` or set CERBAS_BIN" unless File.executable?(CERBAS_BIN)

      @redis_url = redis_url
      # nil unsets: the server must take Redis from its flag, the db from `dev`.
      env = { "CERBAS_REDIS_URL" => nil, "CERBAS_ENV" => nil }
      env["RUST_LOG"] = "info" unless ENV["RUST_LOG"]
      @child = Child.new([CERBAS_BIN, "--config", CONFIG, "--redis", redis_url, "--http", ""],
                         env: env, log: File.join(dir, "cerbas-#{SecureRandom.hex(4)}.log"))
      begin
        wait_ready(CerbasTest.now + 20.0)
      rescue StandardError
        stop
        raise
      end
    end

    def stop = @child.stop

    private

    # Round trips `hello` until the server answers (a debug build may start slowly).
    def wait_ready(deadline)
      client = CerbasClient::Client.new(url: redis_url, env: "dev", user: "test", source: "test")
      loop do
        raise "cerbas exited with #{@child.status}:\n#{@child.tail}" unless @child.alive?

        begin
          return if client.request("hello", timeout: 0.5)["status"] == "ok"
        rescue CerbasClient::TimeoutError
          nil # not serving yet
        end
        raise "cerbas did not answer hello in time:\n#{@child.tail}" if CerbasTest.now > deadline
      end
    ensure
      client&.close
    end
  end

  # The Redis and cerbas shared by the tests, started on first use (a failure to
  # start is remembered: the other tests fail at once with it).
  def self.servers
    raise @servers_error if @servers_error

    @servers ||= begin
      redis = RedisServer.new
      begin
        cerbas = CerbasServer.new(redis.url)
      rescue StandardError
        redis.stop
        raise
      end
      Minitest.after_run do
        warn "cerbas had exited with #{cerbas.child.status}:\n#{cerbas.child.tail}" unless cerbas.child.alive?
        cerbas.stop
        redis.stop
      end
      { redis: redis, cerbas: cerbas }
    rescue StandardError => e
      @servers_error = e
      raise
    end
  end

  # Polls the block until it is true; fails the test with +what+ after +seconds+.
  def self.wait_until(what, seconds = 10.0)
    deadline = now + seconds
    until yield
      raise Minitest::Assertion, "timed out waiting for #{what}" if now > deadline

      sleep 0.01 # poll interval, bounded by the deadline
    end
  end

  # Starts a Redis and a cerbas of their own (for tests that stop, freeze or
  # restart Redis, or halt cerbas), yields them and their directory, and stops
  # both.
  def self.with_own_servers
    with_own_redis do |redis, dir|
      cerbas = CerbasServer.new(redis.url, dir)
      begin
        yield redis, cerbas, dir
      ensure
        cerbas.stop
      end
    end
  end

  # Starts a Redis of its own in a directory of its own (RedisServer's options),
  # yields both, and stops and removes them.
  def self.with_own_redis(**options)
    dir = Dir.mktmpdir("cerbas-ruby-own")
    redis = RedisServer.new(dir, **options)
    begin
      yield redis, dir
    ensure
      redis.stop
      FileUtils.remove_entry(dir, true)
    end
  end

  # Starts +count+ threads each running the block with its index; returns them.
  # Each thread's value is [:ok, value] or [:raised, exception, seconds taken].
  def self.threads(count)
    Array.new(count) do |i|
      Thread.new do
        started = now
        begin
          [:ok, yield(i)]
        rescue StandardError => e
          [:raised, e, now - started]
        end
      end
    end
  end

  # Sets ENV entries for the block (nil deletes), then restores them.
  def self.with_env(vars)
    saved = vars.keys.to_h { |k| [k, ENV[k]] }
    vars.each { |k, v| ENV[k] = v }
    yield
  ensure
    saved&.each { |k, v| ENV[k] = v }
  end

  module Replies
    def ok(data) = { "status" => "ok", "data" => data }
    def error(message) = { "status" => "error", "data" => message }

    # The value with every leaf replaced by its class, so that 1 and 1.0 differ.
    def shape(value)
      case value
      when Hash then value.to_h { |k, v| [k, shape(v)] }
      when Array then value.map { |v| shape(v) }
      else value.class
      end
    end
  end
end

# The example functions of src/functions.rs, through the shared servers.
class CerbasFunctionsTest < Minitest::Test
  include CerbasTest::Replies

  def setup
    @redis_url = CerbasTest.servers[:redis].url
    @client = CerbasClient::Client.new(url: @redis_url, env: "dev", user: "foo", source: "cerbastest")
  end

  def teardown
    @client&.close
  end

  def test_hello
    assert_equal ok("hello world!"), @client.request("hello")
  end

  def test_hello_msgpack
    assert_equal ok("hello world!"), @client.request("hello", msgpack: true)
  end

  def test_hello_as_default_user_and_source
    CerbasClient::Client.open(url: @redis_url, env: "dev") do |c| # user "test", source "test"
      assert_equal ok("hello world!"), c.request("hello")
    end
  end

  def test_echo
    assert_equal ok("a message"), @client.request("echo", { "message" => "a message" })
  end

  def test_withargs
    assert_equal ok({ "bar" => [1, "two"] }), @client.request("withargs", { "foo" => { "bar" => [1, "two"] } })
  end

  def test_witherror
    assert_equal error("unexpected error"), @client.request("witherror")
  end

  def test_sum
    reply = @client.request("sum", { "a" => 1, "b" => 2 })
    assert_equal ok(3), reply
    assert_kind_of Integer, reply["data"]
  end

  def test_dummy
    reply = @client.request("dummy")
    assert_equal({ "status" => "ok", "data" => nil }, reply)
    assert reply.key?("data"), "the reply must carry data: null"
  end

  def test_asyncfunc
    assert_equal ok(""), @client.request("asyncfunc")
  end

  def test_sleep
    assert_equal ok(5), @client.request("sleep", { "ms" => 5 })
  end

  def test_tally
    assert_equal ok(1), @client.request("tally", { "name" => "rb-#{SecureRandom.hex(8)}" })
  end

  def test_primes
    assert_equal ok(25), @client.request("primes", { "below" => 100 })
  end

  def test_unknown_function
    assert_equal error("unknown function: nope"), @client.request("nope")
  end

  def test_sum_rejects_a_string
    reply = @client.request("sum", { "a" => "one", "b" => 2 })
    assert_equal "error", reply["status"]
    assert reply["data"].start_with?("invalid arguments"), reply.inspect
  end

  def test_unregistered_user
    assert_equal error("user not registered: eve"), @client.request("hello", user: "eve")
  end

  def test_halt_refused_for_test_user
    reply = @client.request("halt", { "delay" => 0 }, user: "test", source: "test")
    assert_equal error("user test may not call halt"), reply
  end

  ECHO_VALUES = [
    "ü€😀",
    "ü€😀 — 漢字 \u0000 \\ \" \n",
    { "nested" => { "list" => [1, -2, 3.5, "x", nil, true, false] }, "empty" => {}, "e" => [] },
    [[[[["deep"]]]]],
    2**62, -(2**62), -1, 0, 2**63 - 1, -(2**63),
    0.1, -2.5, 1.0,
    nil, {}, [], "",
    (0...5000).to_a,
    "x" * 200_000
  ].freeze

  def test_echo_round_trips_the_same_in_json_and_msgpack
    ECHO_VALUES.each do |value|
      json = @client.request("echo", { "message" => value })
      packed = @client.request("echo", { "message" => value }, msgpack: true)
      shown = value.inspect[0, 40]
      assert_equal ok(value), json, "json: #{shown}"
      assert_equal ok(value), packed, "msgpack: #{shown}"
      assert_equal shape(value), shape(json["data"]), "json types: #{shown}"
      assert_equal shape(value), shape(packed["data"]), "msgpack types: #{shown}"
    end
  end

  def test_msgpack_strings_are_utf8
    data = @client.request("echo", { "message" => "ü€😀" }, msgpack: true)["data"]
    assert_equal Encoding::UTF_8, data.encoding
    assert data.valid_encoding?
  end

  def test_client_timeout
    started = CerbasTest.now
    assert_raises(CerbasClient::TimeoutError) do
      @client.request("sleep", { "ms" => 3000 }, timeout: 0.5)
    end
    elapsed = CerbasTest.now - started
    assert_operator elapsed, :>=, 0.5
    assert_operator elapsed, :<, 2.5
  end

  def test_delayed_request
    started = CerbasTest.now
    assert_equal ok("hello world!"), @client.request("hello", delay: 300, timeout: 10.0)
    assert_operator CerbasTest.now - started, :>=, 0.3
  end

  def test_one_way_request
    assert_equal false, JSON.parse(@client.body("tally", { "name" => "x" }, reply: false))["reply"]
    refute JSON.parse(@client.body("tally", { "name" => "x" })).key?("reply")
    name = "rb-#{SecureRandom.hex(8)}"
    redis = Redis.new(url: @redis_url, db: 1)
    listener = Redis.new(url: @redis_url, db: 1)
    heard = Queue.new
    ready = Queue.new
    # Listens on every reply channel until 2 s pass without a message: the one-way
    # call must get nothing.
    thread = Thread.new do
      listener.psubscribe_with_timeout(2.0, "CERBAS-RESPONSE-1-*") do |on|
        on.psubscribe { ready << true }
        on.pmessage { |_pattern, channel, _message| heard << channel }
      end
    rescue Redis::TimeoutError
      nil
    end
    begin
      deadline = CerbasTest.now + 10.0
      while ready.empty?
        flunk "no subscription" if CerbasTest.now > deadline
        sleep 0.01 # poll interval, bounded by the deadline
      end
      id = @client.send_one_way("tally", { "name" => name })
      assert_kind_of Integer, id
      assert_operator id, :>, 0
      # Acknowledged (its key deleted) in the same step as a publish would be.
      until redis.get("CERBAS-TALLY-#{name}") == "1" && !redis.exists?(@client.request_key(id))
        flunk "tally never reached 1, or no ack" if CerbasTest.now > deadline
        sleep 0.02 # poll interval, bounded by the deadline
      end
      assert_equal "1", redis.get("CERBAS-TALLY-#{name}")
      refute_nil thread.join(15), "the listener did not stop"
      channels = []
      channels << heard.pop until heard.empty?
      refute_includes channels, @client.reply_channel(id)
    ensure
      thread.kill
      listener.close
      redis.close
    end
  end
end

# One client shared by threads, on the shared servers.
class CerbasSharedClientTest < Minitest::Test
  include CerbasTest::Replies

  def setup
    @redis = CerbasTest.servers[:redis]
    @client = CerbasClient::Client.new(url: @redis.url, env: "dev", user: "foo", source: "cerbastest")
  end

  def teardown
    @client&.close
  end

  def test_sixteen_threads_share_one_client_and_replies_never_cross
    threads = CerbasTest.threads(16) do |t|
      Array.new(40) do |i|
        message = "t#{t}-#{i}-#{'x' * (i * 37 % 300)}"
        # One-way calls take ids from the same blocks without a subscription.
        @client.send_one_way("tally", name: "rb-shared-#{t}") if (i % 10).zero?
        reply = @client.request("echo", { "message" => message }, msgpack: i.odd?)
        [message, reply]
      end
    end
    results = threads.map(&:value)
    results.each { |result| assert_equal :ok, result[0], result.inspect }
    pairs = results.flat_map { |result| result[1] }
    assert_equal 16 * 40, pairs.size
    pairs.each { |message, reply| assert_equal ok(message), reply }
    assert_equal 0, @client.in_flight
    # Channels are unsubscribed (in batches) once answered.
    @redis.with_redis do |r|
      assert_operator r.pubsub("numpat"), :>=, 0
      assert_operator r.pubsub("channels", "*CERBAS-RESPONSE-1-*").size, :<=, 64
    end
  end

  def test_a_forked_child_gets_its_own_connections_and_ids
    assert_equal ok("parent"), @client.request("echo", message: "parent")
    reader, writer = IO.pipe
    pid = fork do
      reader.close
      replies = Array.new(20) { |i| @client.request("echo", message: "child-#{i}") }
      writer.write(JSON.generate(replies))
      writer.close
      exit!(0)
    end
    writer.close
    parent = Array.new(20) { |i| @client.request("echo", message: "parent-#{i}") }
    child = JSON.parse(reader.read)
    _, status = Process.wait2(pid)
    assert status.success?
    assert_equal Array.new(20) { |i| ok("child-#{i}") }, child
    assert_equal Array.new(20) { |i| ok("parent-#{i}") }, parent
  ensure
    reader&.close
  end

  def test_no_connection_per_request
    @client.request("hello") # opens the client's two connections
    before = Integer(@redis.info_field("stats", "total_connections_received"))
    incrby = -> { @redis.with_redis { |r| r.info("commandstats").dig("incrby", "calls").to_i } }
    incrby_before = incrby.call
    CerbasTest.threads(4) { 50.times { @client.request("echo", message: "hi") } }.each(&:join)
    after = Integer(@redis.info_field("stats", "total_connections_received"))
    # 200 calls; the info_field connections themselves count 1 each, and the
    # server may open one of its own meanwhile.
    assert_operator after - before, :<=, 4, "#{after - before} connections for 200 calls"
    # Ids come in blocks of 100 (a block may be reserved ahead).
    assert_operator incrby.call - incrby_before, :<=, 3
  end

  def test_keyword_arguments_are_the_functions_arguments
    assert_equal ok(3), @client.request("sum", a: 1, b: 2)
    assert_equal ok(3), @client.request("sum", { "a" => 1, "b" => 2 })
    assert_equal ok(3), @client.request("sum", a: 1, b: 2, msgpack: true, timeout: 5)
    assert_equal ok("hi"), @client.request("echo", message: "hi", user: "foo")
    assert_raises(ArgumentError) { @client.request("sum", { "a" => 1 }, b: 2) }
    id = @client.send_one_way("tally", name: "rb-#{SecureRandom.hex(8)}")
    assert_kind_of Integer, id
  end

  def test_reply_published_before_the_subscription_settled
    id = nil
    @redis.with_redis do |r|
      id = r.incr("CERBAS-COUNTER")
      r.set(@client.request_key(id), JSON.generate({ "func" => "echo", "args" => { "message" => "late" },
                                                     "user" => "foo", "source" => "cerbastest" }))
      r.rpush("CERBAS-QUEUE", id)
      # Answered (the key deleted): the reply went out to nobody.
      CerbasTest.wait_until("the server to answer request #{id}") { !r.exists?(@client.request_key(id)) }
    end
    started = CerbasTest.now
    assert_equal ok("late"), @client.send(:await_reply, id, timeout: 6.0)
    # The server republishes for 5 s after its first publish.
    assert_operator CerbasTest.now - started, :<, 5.0
    # The same client still serves ordinary calls.
    assert_equal ok("after"), @client.request("echo", message: "after")
  end

  def test_close_fails_calls_in_flight_at_once_and_later_calls
    threads = CerbasTest.threads(4) { @client.request("sleep", { "ms" => 3000 }, timeout: 10.0) }
    CerbasTest.wait_until("4 calls in flight") { @client.in_flight == 4 }
    closed_at = CerbasTest.now
    @client.close
    threads.each do |thread|
      result = thread.value
      assert_equal :raised, result[0], result.inspect
      assert_kind_of CerbasClient::ClosedError, result[1]
    end
    assert_operator CerbasTest.now - closed_at, :<, 0.5
    started = CerbasTest.now
    assert_raises(CerbasClient::ClosedError) { @client.request("hello") }
    assert_raises(CerbasClient::ClosedError) { @client.send_one_way("hello") }
    assert_operator CerbasTest.now - started, :<, 0.1
    assert_nil @client.close # twice is fine
    assert @client.closed?
  end

  def test_a_call_interrupted_by_timeout_timeout_is_forgotten
    assert_raises(::Timeout::Error) do
      ::Timeout.timeout(0.2) { @client.request("sleep", { "ms" => 1000 }, timeout: 5.0) }
    end
    assert_equal 0, @client.in_flight
    assert_equal ok("next"), @client.request("echo", message: "next")
  end

  def test_error_types
    assert_operator CerbasClient::TimeoutError, :<, ::Timeout::Error
    [CerbasClient::TimeoutError, CerbasClient::ConnectionError, CerbasClient::ClosedError,
     CerbasClient::ProtocolError].each do |klass|
      assert_operator klass, :<, CerbasClient::Error
      assert_operator klass, :<, StandardError
    end
    assert_operator CerbasClient::ClosedError, :<, CerbasClient::ConnectionError
    # Code that rescues the standard timeout catches ours.
    caught = begin
      @client.request("sleep", { "ms" => 2000 }, timeout: 0.2)
    rescue ::Timeout::Error => e
      e
    end
    assert_kind_of CerbasClient::TimeoutError, caught
    assert_match(/no reply to sleep \(request \d+\) within 0.2 s/, caught.message)
  end

  # The client's timeout error is CerbasClient::TimeoutError: no constant of the
  # client's is named Timeout, so inside its namespace, and in code that
  # includes it, Timeout is still Ruby's ::Timeout.
  def test_the_standard_timeout_is_not_shadowed
    namespaces = [CerbasClient] + CerbasClient.constants.map { |c| CerbasClient.const_get(c) }.grep(Module)
    namespaces.each do |ns|
      refute ns.const_defined?(:Timeout, false), "#{ns} defines its own Timeout"
    end
    assert_same ::Timeout, CerbasClient.module_eval("Timeout")
    assert_same ::Timeout, Class.new { include CerbasClient }.class_eval("Timeout")
  end

  def test_garbage_on_the_reply_channel_is_a_protocol_error
    id = @redis.with_redis { |r| r.incr("CERBAS-COUNTER") }
    waiter = Thread.new do
      @client.send(:await_reply, id, timeout: 5.0)
    rescue StandardError => e
      e
    end
    CerbasTest.wait_until("the waiter to subscribe") do
      @redis.with_redis { |r| r.pubsub("numsub", @client.reply_channel(id)).last.to_i == 1 }
    end
    @redis.with_redis { |r| r.publish(@client.reply_channel(id), "not json") }
    error = waiter.value
    assert_kind_of CerbasClient::ProtocolError, error
    assert_match(/cannot be decoded/, error.message)
  end

  def test_redis_down_is_a_connection_error_at_once
    port = CerbasTest.free_port # nothing listens there
    CerbasClient::Client.open(url: "redis://127.0.0.1:#{port}", env: "dev") do |c|
      started = CerbasTest.now
      error = assert_raises(CerbasClient::ConnectionError) { c.request("hello", timeout: 5.0) }
      assert_match(/cannot connect to Redis at 127.0.0.1:#{port}/, error.message)
      assert_raises(CerbasClient::ConnectionError) { c.send_one_way("hello", timeout: 5.0) }
      assert_operator CerbasTest.now - started, :<, 1.0
    end
  end

  def test_password_and_unix_socket
    socket = File.join(CerbasTest.tmpdir, "redis-#{SecureRandom.hex(4)}.sock") # removed with tmpdir
    CerbasTest.with_own_redis(args: ["--unixsocket", socket], password: "s3cr+t") do |redis|
      encoded = "s3cr%2Bt" # URL-encoded, as the server reads it
      ["redis://:#{encoded}@127.0.0.1:#{redis.port}/2", "redis+unix://:#{encoded}@#{socket}?db=2"].each do |url|
        CerbasClient::Client.open(url: url) do |c|
          # One-way: queued without a cerbas server (this Redis has none).
          id = c.send_one_way("hello", timeout: 5.0)
          body = redis.with_redis(db: 2) { |r| r.get(c.request_key(id)) }
          assert_equal "hello", JSON.parse(body)["func"], url
        end
      end
      CerbasClient::Client.open(url: "redis://127.0.0.1:#{redis.port}") do |c| # no password
        assert_raises(CerbasClient::ConnectionError) { c.send_one_way("hello", timeout: 5.0) }
      end
    end
  end

  def test_refused_password_is_a_connection_error
    url = @redis.url.sub("redis://", "redis://:wrong@")
    CerbasClient::Client.open(url: url, env: "dev") do |c|
      error = assert_raises(CerbasClient::ConnectionError) { c.request("hello", timeout: 5.0) }
      assert_match(/refused AUTH/, error.message)
    end
  end
end

# Faults of Redis itself (frozen, restarted), each on servers of its own.
class CerbasRedisFaultTest < Minitest::Test
  include CerbasTest::Replies

  def client(url, **options)
    CerbasClient::Client.new(url: url, env: "dev", user: "foo", source: "cerbastest", **options)
  end

  # Servers of its own and a client that has made one call; closes the client.
  def with_own_servers_and_client(**options)
    CerbasTest.with_own_servers do |redis, _cerbas|
      c = client(redis.url, **options)
      begin
        assert_equal ok("hello world!"), c.request("hello")
        yield redis, c
      ensure
        c.close
      end
    end
  end

  def test_frozen_redis_the_callers_timeout_holds
    CerbasTest.with_own_servers do |redis, _cerbas|
      warm = client(redis.url)
      cold = client(redis.url) # no connection yet: it connects into the frozen Redis
      begin
        assert_equal ok("hello world!"), warm.request("hello")
        redis.pause
        begin
          [warm, cold].each do |c|
            started = CerbasTest.now
            assert_raises(CerbasClient::TimeoutError) { c.request("hello", timeout: 1.0) }
            elapsed = CerbasTest.now - started
            assert_in_delta 1.0, elapsed, 0.5
          end
        ensure
          redis.resume
        end
        assert_equal ok("hello world!"), warm.request("hello", timeout: 10.0)
        assert_equal ok("hello world!"), cold.request("hello", timeout: 10.0)
      ensure
        warm.close
        cold.close
      end
    end
  end

  def test_frozen_redis_is_a_connection_error_after_the_socket_timeout
    with_own_servers_and_client(socket_timeout: 1.0) do |redis, c|
    redis.pause
    begin
      started = CerbasTest.now
      # PING after 1 s of silence, no PONG within 1 s, no reconnect within 1 s.
      assert_raises(CerbasClient::ConnectionError) { c.request("hello", timeout: 10.0) }
      assert_operator CerbasTest.now - started, :<, 5.0
    ensure
      redis.resume
    end
    assert_equal ok("hello world!"), c.request("hello", timeout: 10.0)
    end
  end

  def test_redis_restarted_with_calls_in_flight_and_the_counter_set_back
    CerbasTest.with_own_servers do |redis, _cerbas|
      a = client(redis.url)
      b = client(redis.url) # another process, after the restart
      begin
        assert_equal ok("hello world!"), a.request("hello")
        first = redis.with_redis { |r| Integer(r.get("CERBAS-COUNTER")) }
        in_flight = CerbasTest.threads(4) { |i| a.request("sleep", { "ms" => 2000 + i }, timeout: 10.0) }
        CerbasTest.wait_until("4 calls in flight") { a.in_flight == 4 }
        restarted_at = CerbasTest.now
        redis.restart
        # The counter set back: the new Redis hands out the ids of the calls in flight.
        redis.with_redis { |r| r.set("CERBAS-COUNTER", first - CerbasClient::Client::ID_BLOCK) }
        in_flight.each do |thread|
          result = thread.value
          assert_equal :raised, result[0], "a call in flight got #{result.inspect}"
          assert_kind_of CerbasClient::ConnectionError, result[1]
        end
        assert_operator CerbasTest.now - restarted_at, :<, 3.0, "calls in flight did not fail at once"
        # Wait for cerbas to be back on the new Redis.
        CerbasTest.wait_until("cerbas to serve the new Redis", 30.0) do
          a.request("hello", timeout: 1.0) == ok("hello world!")
        rescue CerbasClient::Error
          false
        end
        # A lifted the counter on its first call; B (another process) reserves
        # after it. Every caller gets its own reply.
        threads = CerbasTest.threads(8) do |t|
          c = t.even? ? a : b
          Array.new(10) do |i|
            message = "#{t.even? ? 'A' : 'B'}-#{t}-#{i}"
            [message, c.request("echo", { "message" => message }, timeout: 10.0)]
          end
        end
        threads.each do |thread|
          result = thread.value
          assert_equal :ok, result[0], result.inspect
          result[1].each { |message, reply| assert_equal ok(message), reply }
        end
        # A had seen ids up to `first`: it lifted the counter past them (the
        # server may republish old replies on the new Redis for a few seconds).
        lifted = redis.with_redis { |r| Integer(r.get("CERBAS-COUNTER")) }
        assert_operator lifted, :>=, first + CerbasClient::Client::COUNTER_LIFT
      ensure
        a.close
        b.close
      end
    end
  end

  def test_redis_restarted_before_the_client_noticed_fails_calls_in_flight
    with_own_servers_and_client do |redis, c|
    in_flight = CerbasTest.threads(3) { c.request("sleep", { "ms" => 2000 }, timeout: 10.0) }
    CerbasTest.wait_until("3 calls in flight") { c.in_flight == 3 }
    # Holding the client's lock keeps its I/O thread from seeing the broken
    # connection until the new Redis listens: it reconnects at once, to
    # another run_id, where the ids of the calls in flight may be handed out
    # again.
    c.instance_variable_get(:@lock).synchronize { redis.restart }
    in_flight.each do |thread|
      result = thread.value
      assert_equal :raised, result[0], "a call in flight got #{result.inspect}"
      assert_kind_of CerbasClient::ConnectionError, result[1]
      assert_match(/Redis restarted/, result[1].message)
    end
    CerbasTest.wait_until("cerbas to serve the new Redis", 30.0) do
      c.request("hello", timeout: 1.0) == ok("hello world!")
    rescue CerbasClient::Error
      false
    end
    end
  end

  def test_redis_killed_frozen_and_restarted_under_load_replies_never_cross
    with_own_servers_and_client do |redis, c|
      outcomes = Queue.new
      done = false
      threads = CerbasTest.threads(16) do |t|
        i = 0
        until done
          i += 1
          message = "#{t}-#{i}"
          begin
            if (i % 10).zero?
              c.send_one_way("tally", name: "rb-fault", timeout: 1.0)
            else
              # Tiny timeouts leave replies to nobody, which the server republishes.
              reply = c.request("echo", { "message" => message }, msgpack: i.odd?, timeout: [0.002, 0.05, 2.0][i % 3])
              outcomes << (reply == ok(message) ? :ok : [:crossed, message, reply])
            end
          rescue CerbasClient::TimeoutError, CerbasClient::ConnectionError => e
            outcomes << e.class
          end
        end
      end
      begin
        CerbasTest.wait_until("load before the fault") { outcomes.size >= 500 }
        redis.restart("KILL")
        before = outcomes.size
        CerbasTest.wait_until("load on the new Redis", 20.0) { outcomes.size >= before + 1500 }
        redis.pause
        sleep 0.5 # frozen this long under load
        redis.resume
        CerbasTest.wait_until("load after the freeze", 20.0) { outcomes.size >= before + 2500 }
      ensure
        done = true
      end
      threads.each { |thread| assert_equal :ok, thread.value[0], thread.value.inspect }
      seen = []
      seen << outcomes.pop until outcomes.empty?
      crossed = seen.select { |o| o.is_a?(Array) }
      assert_empty crossed, "#{crossed.size} replies crossed, e.g. #{crossed.first.inspect}"
      assert_operator seen.count(:ok), :>, 500
      assert_equal 0, c.in_flight
      assert_equal ok("final"), c.request("echo", message: "final", timeout: 10.0)
    end
  end

  def test_old_replies_republished_after_a_restart_never_reach_a_new_call
    with_own_servers_and_client do |redis, c|
    # Another client's requests, answered to nobody: the server republishes
    # their replies for 5 s, across the restart below.
    old = redis.with_redis do |r|
      Array.new(8) do |i|
        id = r.incr("CERBAS-COUNTER")
        r.set(c.request_key(id), JSON.generate({ "func" => "echo", "args" => { "message" => "old-#{i}" },
                                                 "user" => "foo", "source" => "cerbastest" }))
        r.rpush("CERBAS-QUEUE", id)
        id
      end
    end
    redis.with_redis do |r|
      CerbasTest.wait_until("the old requests answered") { old.none? { |id| r.exists?(c.request_key(id)) } }
    end
    redis.restart("KILL")
    # The counter set back to just before the old ids.
    redis.with_redis { |r| r.set("CERBAS-COUNTER", old.first - 1) }
    # Calls in flight while old replies are republished: without lifting the
    # counter they would take the old ids and get "old-..." replies.
    threads = CerbasTest.threads(old.size) { |i| c.request("sleep", { "ms" => 4500 + i }, timeout: 15.0) }
    threads.each_with_index { |thread, i| assert_equal [:ok, ok(4500 + i)], thread.value }
    lifted = redis.with_redis { |r| Integer(r.get("CERBAS-COUNTER")) }
    assert_operator lifted, :>, old.last + CerbasClient::Client::COUNTER_LIFT
    end
  end

  def test_subscriber_connection_killed_calls_in_flight_still_get_their_reply
    with_own_servers_and_client do |redis, c|
    threads = CerbasTest.threads(4) { |i| c.request("sleep", { "ms" => 1000 + i }, timeout: 10.0) }
    CerbasTest.wait_until("4 calls in flight") { c.in_flight == 4 }
    # Same Redis (same run_id): the client resubscribes and the replies arrive.
    killed = redis.with_redis { |r| r.call("CLIENT", "KILL", "TYPE", "pubsub") }
    assert_operator killed, :>=, 1
    threads.each_with_index do |thread, i|
      assert_equal [:ok, ok(1000 + i)], thread.value
    end
    end
  end
end

# The example script, against servers of its own (it halts its server).
class CerbasExampleTest < Minitest::Test
  def test_example_script_calls_and_halts_the_server
    CerbasTest.with_own_servers do |redis, cerbas, dir|
      out = File.join(dir, "example.out")
      script = CerbasTest::Child.new([RbConfig.ruby, File.join(CerbasTest::RUBY_DIR, "example.rb")],
                                     env: { "CERBAS_REDIS_URL" => redis.url, "CERBAS_ENV" => nil },
                                     log: out, chdir: dir)
      status = script.wait(30.0)
      script.stop
      lines = File.readlines(out, chomp: true)
      assert status&.success?, "example.rb failed (#{status.inspect}):\n#{lines.join("\n")}"
      assert_equal 4, lines.size, lines.join("\n")
      hello = /"status"\s*=>\s*"ok", "data"\s*=>\s*"hello world!"/
      assert_match hello, lines[0]
      assert_match hello, lines[1]
      assert_match(/"status"\s*=>\s*"error", "data"\s*=>\s*"timeout"/, lines[2])
      assert_match(/"status"\s*=>\s*"ok", "data"\s*=>\s*""/, lines[3])
      code = cerbas.child.wait(10.0)
      assert code, "cerbas still running 10 s after halt:\n#{cerbas.child.tail}"
      assert code.success?, "cerbas exited with #{code}:\n#{cerbas.child.tail}"
    end
  end
end

# Finding Redis, without a server.
class CerbasResolveTest < Minitest::Test
  CLEAN = { "CERBAS_REDIS_URL" => nil, "CERBAS_ENV" => nil }.freeze

  def env(vars = {}, &block)
    CerbasTest.with_env(CLEAN.merge(vars), &block)
  end

  def test_defaults
    env do
      c = CerbasClient::Client.new
      assert_equal ["redis://127.0.0.1:6379", "dev", 1], [c.url, c.env, c.db]
      assert_equal({ host: "127.0.0.1", port: 6379, db: 1 }, c.connection_options.slice(:host, :port, :db))
      assert_equal "CERBAS-RESPONSE-1-0000000007", c.reply_channel(7)
      assert_equal "MSGPACK:CERBAS-RESPONSE-1-0000000007", c.reply_channel(7, msgpack: true)
      assert_equal "CERBAS-REQ-0000000007", c.request_key(7)
      assert_equal "CERBAS-COUNTER", c.counter_key
      assert_equal "CERBAS-QUEUE", c.queue_key
      assert_equal ["test", "test", 10.0], [c.user, c.source, c.timeout]
    end
  end

  def test_prod_env_uses_db_8
    env("CERBAS_ENV" => "prod") do
      c = CerbasClient::Client.new
      assert_equal 8, c.db
      assert_equal 8, c.connection_options[:db]
      assert_equal "CERBAS-RESPONSE-8-0000012345", c.reply_channel(12_345)
    end
  end

  def test_db_in_url_wins
    env("CERBAS_REDIS_URL" => "redis://:secret@10.0.0.5:6380/3", "CERBAS_ENV" => "prod") do
      c = CerbasClient::Client.new
      assert_equal ["redis://:secret@10.0.0.5:6380/3", "prod", 3], [c.url, c.env, c.db]
      assert_equal({ host: "10.0.0.5", port: 6380, db: 3 }, c.connection_options.slice(:host, :port, :db))
      assert_equal "secret", c.connection_options[:password]
    end
  end

  def test_db_zero_in_url_wins
    env("CERBAS_ENV" => "prod") do
      assert_equal 0, CerbasClient::Client.new(url: "redis://127.0.0.1:6379/0").db
      assert_equal 8, CerbasClient::Client.new(url: "redis://127.0.0.1:6379/").db
    end
  end

  def test_arguments_win_over_environment
    env("CERBAS_REDIS_URL" => "redis://10.0.0.5:6380/3", "CERBAS_ENV" => "dev") do
      c = CerbasClient::Client.new(url: "redis://127.0.0.1:7000", env: "prod")
      assert_equal ["redis://127.0.0.1:7000", 8], [c.url, c.db]
    end
  end

  def test_empty_variables_count_as_unset
    env("CERBAS_REDIS_URL" => "", "CERBAS_ENV" => "") do
      assert_equal ["redis://127.0.0.1:6379", "dev", 1], CerbasClient.resolve
    end
  end

  def test_bad_env_is_refused
    env("CERBAS_ENV" => "staging") do
      assert_raises(ArgumentError) { CerbasClient::Client.new }
      # as the server: a bad CERBAS_ENV is an error even when the URL names a db
      assert_raises(ArgumentError) { CerbasClient::Client.new(url: "redis://127.0.0.1:6379/2") }
    end
    env { assert_raises(ArgumentError) { CerbasClient::Client.new(env: "test") } }
  end

  def test_bad_db_in_url_is_refused
    env do
      assert_raises(ArgumentError) { CerbasClient::Client.new(url: "redis://127.0.0.1:6379/x") }
      assert_raises(ArgumentError) { CerbasClient::Client.new(url: "redis://127.0.0.1:6379/-1") }
    end
  end

  def test_unix_socket_url
    env do
      assert_equal 4, CerbasClient.resolve(url: "unix:///tmp/redis.sock?db=4").last
      c = CerbasClient::Client.new(url: "redis+unix:///tmp/redis.sock", env: "prod")
      assert_equal 8, c.db
      assert_equal "/tmp/redis.sock", c.connection_options[:path]
    end
  end

  def test_body
    env do
      c = CerbasClient::Client.new(user: "foo", source: "cerbastest")
      assert_equal({ "func" => "sum", "args" => { "a" => 1 }, "user" => "foo", "source" => "cerbastest" },
                   JSON.parse(c.body("sum", { "a" => 1 })))
      assert_equal({ "func" => "hello", "user" => "tom", "source" => "web", "delay" => 5 },
                   JSON.parse(c.body("hello", user: "tom", source: "web", delay: 5)))
    end
  end
end
