# frozen_string_literal: true

# A Ruby client for cerbas, the Redis-backed job server (wire protocol:
# docs/PROTOCOL.md). Not for serving requests (that is the Rust server) and not
# a Redis library (lib/cerbas_client/connection.rb speaks just enough RESP).
#
# A Client is safe to share between threads: every thread may call +request+ on
# one Client at the same time. It keeps two Redis connections for all of them:
#
# - a subscriber connection, on which each call's reply channel
#   <tt>P-RESPONSE-{db}-{id:010}</tt> (or <tt>MSGPACK:P-RESPONSE-{db}-{id:010}</tt>)
#   is subscribed and unsubscribed; one I/O thread reads it and hands each reply
#   to the thread waiting for it;
# - a command connection, for <tt>INCRBY P-COUNTER 100</tt> (ids are reserved in
#   blocks of 100) and the pushes: <tt>MSET P-REQ-{id:010} body ...</tt> and
#   <tt>RPUSH P-QUEUE id ...</tt>, pipelined; when Redis has not answered the
#   last pushes yet, the calls that became ready meanwhile go in one MSET and one
#   RPUSH.
#
# A call's push is sent only once Redis has confirmed its subscription, so no
# reply is missed. The channels of the next 32 ids of the block are subscribed
# ahead, so a call usually finds its subscription confirmed and pushes at once:
# one round trip plus the server's time. A call waits at most its timeout,
# whatever Redis does (even frozen). If the subscriber connection breaks, the
# client reconnects: to the same Redis (same INFO run_id) it subscribes again to
# every channel still awaited (a reply published meanwhile is republished by the
# server, for 5 s); to a restarted Redis (another run_id) it fails every call in
# flight at once with a ConnectionError (ids may repeat after a restart, and a
# caller must never get another request's reply) and reserves a new block of
# ids, first lifting the counter well past the ids it saw (the server may
# republish the old ids' replies on the new Redis for 5 s). A forked child
# (preloading app servers) opens connections of its own.
#
# Redis is found as the server finds it: the URL is the argument, else
# +CERBAS_REDIS_URL+, else <tt>redis://127.0.0.1:6379</tt> (a password goes in the
# URL: <tt>redis://:secret@host:6379</tt>); the database is the one the URL names
# (<tt>redis://host:6379/3</tt>), else 1 for env +dev+ and 8 for +prod+ (env is the
# argument, else +CERBAS_ENV+, else +dev+; anything else is an ArgumentError).
#
# Example:
#
#   require "cerbas_client"
#
#   c = CerbasClient::Client.new(user: "foo", source: "cerbastest")
#   c.request("hello")                       # => {"status"=>"ok", "data"=>"hello world!"}
#   c.request("sum", a: 1, b: 2)             # => {"status"=>"ok", "data"=>3}
#   c.request("sum", {"a" => 1, "b" => 2})   # the same
#   c.request("hello", msgpack: true)        # the same reply, sent as msgpack
#   c.send_one_way("tally", name: "x")       # queued, no reply published; => the id
#   begin
#     c.request("sleep", {"ms" => 3000}, timeout: 0.5)
#   rescue CerbasClient::TimeoutError => e   # also a ::Timeout::Error
#     puts e.message
#   end
#   c.close
#
# Errors are CerbasClient::Error (lib/cerbas_client/errors.rb): TimeoutError,
# ConnectionError (ClosedError), ProtocolError. A function's own error is not
# raised: it is the reply <tt>{"status" => "error", "data" => message}</tt>.
#
# Dependencies: msgpack (Debian's ruby-msgpack) and Ruby's standard library. The
# tests and bench.rb also use the redis gem (ruby-redis).

require "json"
require "msgpack"
require "uri"
require_relative "cerbas_client/errors"
require_relative "cerbas_client/connection"

module CerbasClient
  DEFAULT_URL = "redis://127.0.0.1:6379"
  DEFAULT_ENV = "dev"
  DEFAULT_PREFIX = "CERBAS"
  ENV_DBS = { "dev" => 1, "prod" => 8 }.freeze

  module_function

  # Returns <tt>[url, env, db]</tt> as the server would choose them (see above).
  def resolve(url: nil, env: nil)
    url = present(url) || present(ENV["CERBAS_REDIS_URL"]) || DEFAULT_URL
    env = present(env) || present(ENV["CERBAS_ENV"]) || DEFAULT_ENV
    raise ArgumentError, "env must be dev or prod, not #{env.inspect}" unless ENV_DBS.key?(env)

    [url, env, url_db(url) || ENV_DBS.fetch(env)]
  end

  # The database a Redis URL names, or nil: the path of <tt>redis://h:p/3</tt>, or
  # <tt>db=</tt> in the query of a <tt>unix://</tt> URL (as the server reads it).
  def url_db(url)
    rest, query = url.split("?", 2)
    text =
      if unix?(url)
        query.to_s.split("&").filter_map { |kv| kv.delete_prefix("db=") if kv.start_with?("db=") }.first.to_s
      else
        after_scheme = rest.include?("://") ? rest.split("://", 2).last : rest
        after_scheme.include?("/") ? after_scheme.split("/", 2).last.sub(%r{/+\z}, "") : ""
      end
    return nil if text.empty?
    raise ArgumentError, "redis URL names no valid db: #{text.inspect}" unless text.match?(/\A\+?\d+\z/)

    Integer(text.delete_prefix("+"), 10)
  end

  def unix?(url)
    url.start_with?("unix:", "redis+unix:")
  end

  def present(value)
    value unless value.nil? || value.empty?
  end
  private_class_method :present

  # A connection to one cerbas deployment: a Redis URL, a database, a prefix.
  # Thread-safe: share one per process (see the file comment).
  #
  # +user+ and +source+ are sent with every request unless a call names others;
  # they must be registered in the server's configuration. +timeout+ (seconds) is
  # how long a request waits for its reply unless a call names another.
  # +socket_timeout+ (seconds) bounds connecting and each answer of Redis to the
  # client's own connections: a Redis that answers nothing for that long (PING
  # included) is taken as lost, and the calls in flight fail with ConnectionError
  # (those with a shorter timeout raise TimeoutError first).
  class Client
    # Ids reserved per INCRBY of the counter.
    ID_BLOCK = 100
    # The subscriber connection is PINGed after this many seconds without a word
    # from Redis while calls wait (a frozen or silently dropped connection).
    PING_AFTER = 1.0
    # How often the I/O thread looks at its deadlines when nothing happens.
    TICK = 0.25
    # Channels of the next ids subscribed ahead, so that a call finds its
    # subscription confirmed and pushes at once (one round trip, not two).
    AHEAD = 32
    # How far past the highest id it saw a client lifts a counter that went back.
    COUNTER_LIFT = 100 * ID_BLOCK

    # One call in flight (request or one-way). Fields are guarded by the
    # client's lock. +state+: :new, :subscribing (SUBSCRIBE sent), :listening
    # (confirmed, nothing to push), :ready (confirmed, to push), :pushing (sent),
    # :pushed (Redis took it).
    Call = Struct.new(:func, :payload, :msgpack, :one_way, :id, :run_id, :channel, :state, :done, :reply,
                      :error, :cond, keyword_init: true)
    # A block of ids from one INCRBY, valid only on the Redis of +run_id+.
    # +ahead_until+: the last id whose channel was subscribed ahead.
    IdBlock = Struct.new(:next_id, :last_id, :run_id, :ahead_until)
    # An INCRBY of the counter in flight (see take_id and reserve_next).
    Reservation = Struct.new(:sent, :done, :error)

    attr_reader :url, :env, :db, :prefix, :user, :source, :timeout, :socket_timeout

    # Like +new+; with a block, yields the client, closes it and returns the
    # block's value.
    def self.open(**kwargs)
      client = new(**kwargs)
      return client unless block_given?

      begin
        yield client
      ensure
        client.close
      end
    end

    # Connects nothing yet: the connections open on the first call.
    def initialize(url: nil, env: nil, prefix: DEFAULT_PREFIX, user: "test", source: "test", timeout: 10.0,
                   socket_timeout: 5.0)
      @url, @env, @db = CerbasClient.resolve(url: url, env: env)
      @prefix = prefix
      @user = user
      @source = source
      @timeout = timeout
      @socket_timeout = socket_timeout
      @options = parse_url
      @lock = Mutex.new
      @changed = ConditionVariable.new # subscriber connected or failed; ids reserved or failed
      @closed = false
      @io_thread = nil
      @wake_r = @wake_w = nil
      @inflight = {}.compare_by_identity # Call => true
      @waiters = {} # reply channel => Call
      @unsubscribe = [] # channels to unsubscribe with the next write on @sub
      @to_push = [] # calls whose push waits for the command connection
      @sub = nil # subscriber Connection
      @sub_wanted = 0 # callers waiting for @sub
      @sub_failures = 0 # connection attempts that failed, and the last error
      @sub_error = nil
      @sub_heard = @sub_pinged = nil
      @known_run_id = nil # of the last Redis the subscriber reached
      @cmd = nil # command Connection
      @cmd_sent = [] # [kind, object, run_id, sent at] per reply awaited on @cmd, in order
      @block = nil # the ids being taken
      @next_block = nil # the next ones, reserved when half of @block is taken
      @reservation = nil
      @ahead = {} # JSON reply channel subscribed ahead => :pending, or the run_id that confirmed it
      @pid = Process.pid
      @counter_seen = nil # the highest INCRBY result, kept across Redis restarts,
      @counter_run_id = nil # and the run_id of the Redis that gave it
    end

    # Where Redis is: host and port (ssl: true for rediss://) or path, db,
    # username, password.
    def connection_options = @options.dup

    # Key and channel names (docs/PROTOCOL.md).

    def counter_key = "#{prefix}-COUNTER"
    def queue_key = "#{prefix}-QUEUE"
    def request_key(id) = format("%s-REQ-%010d", prefix, id)

    def reply_channel(id, msgpack: false)
      channel = format("%s-RESPONSE-%d-%010d", prefix, db, id)
      msgpack ? "MSGPACK:#{channel}" : channel
    end

    # The JSON request body. +delay+ (ms) asks the server to run it no earlier
    # than that long after it reads it; <tt>reply: false</tt> asks it to publish
    # no reply (a one-way call).
    def body(func, args = nil, user: nil, source: nil, delay: nil, reply: true)
      request = { "func" => func }
      request["args"] = args unless args.nil?
      request["user"] = user || self.user
      request["source"] = source || self.source
      request["delay"] = delay unless delay.nil?
      request["reply"] = false unless reply
      JSON.generate(request, max_nesting: false)
    end

    # Calls +func+ and returns the reply Hash
    # <tt>{"status" => "ok" | "error", "data" => ...}</tt>. The function's
    # arguments are +args+ (a Hash) or the other keyword arguments:
    # <tt>request("sum", a: 1, b: 2)</tt> is <tt>request("sum", {"a" => 1, "b" => 2})</tt>
    # (pass a Hash for arguments named like the options below).
    #
    # Options: +msgpack+ (the reply is sent as msgpack), +user+, +source+ (instead
    # of the client's), +delay+ (ms, see #body), +timeout+ (seconds, instead of the
    # client's; it bounds the whole call). Raises TimeoutError, ConnectionError,
    # ClosedError, ProtocolError (all CerbasClient::Error).
    def request(func, args = nil, msgpack: false, user: nil, source: nil, timeout: nil, delay: nil, **kwargs)
      timeout ||= self.timeout
      deadline = now + timeout
      payload = body(func, merge_args(args, kwargs), user: user, source: source, delay: delay)
      call = Call.new(func: func, payload: payload, msgpack: msgpack, one_way: false, state: :new)
      run(call, deadline, timeout)
      decode(call)
    end

    # Queues a one-way call (nobody waits for its reply, and the server publishes
    # none: the body says <tt>"reply": false</tt>); returns its id once Redis has
    # it. Arguments and options as for #request (no +msgpack+).
    def send_one_way(func, args = nil, user: nil, source: nil, delay: nil, timeout: nil, **kwargs)
      timeout ||= self.timeout
      deadline = now + timeout
      payload = body(func, merge_args(args, kwargs), user: user, source: source, delay: delay, reply: false)
      call = Call.new(func: func, payload: payload, msgpack: false, one_way: true, state: :new)
      run(call, deadline, timeout)
      call.id
    end

    # How many calls are in flight (waiting for an id, a push or a reply).
    def in_flight = @lock.synchronize { @inflight.size }

    # Closes the connections. Calls in flight fail at once with ClosedError, and
    # so does every later call.
    def close
      thread = nil
      @lock.synchronize do
        return if @closed

        @closed = true
        fail_all(ClosedError.new("the client was closed"))
        fail_reservation(ClosedError.new("the client was closed"))
        @changed.broadcast
        [@sub, @cmd].each { |conn| conn&.close }
        @sub = @cmd = nil
        thread = @io_thread
        wake
      end
      thread&.join(1.0) unless thread.equal?(Thread.current)
      [@wake_r, @wake_w].each { |io| io&.close unless io&.closed? }
      nil
    end

    def closed? = @lock.synchronize { @closed }

    private

    def now = Process.clock_gettime(Process::CLOCK_MONOTONIC)

    # Where to connect, from the URL (as the redis gem reads it: user and
    # password URL-decoded, rediss:// is TLS).
    def parse_url
      uri = URI(CerbasClient.unix?(url) ? url.sub(/\Aredis\+unix:/, "unix:") : url)
      options =
        case uri.scheme
        when "unix" then { path: uri.path }
        when "redis", "rediss"
          host = (uri.host || "127.0.0.1").sub(/\A\[(.*)\]\z/, '\\1') # [::1] is ::1
          { host: host, port: uri.port || 6379, ssl: uri.scheme == "rediss" }
        else raise ArgumentError, "redis URL must be redis://, rediss:// or unix://, not #{url.inspect}"
        end
      options[:username] = URI.decode_www_form_component(uri.user) if uri.user && !uri.user.empty?
      options[:password] = URI.decode_www_form_component(uri.password) if uri.password && !uri.password.empty?
      options[:db] = db
      options
    rescue URI::InvalidURIError => e
      raise ArgumentError, "bad redis URL #{url.inspect}: #{e.message}"
    end

    def merge_args(args, kwargs)
      return args if kwargs.empty?
      raise ArgumentError, "give the arguments as a Hash or as keywords, not both" unless args.nil?

      kwargs.transform_keys(&:to_s)
    end

    def decode(call)
      data = call.reply
      reply =
        if call.msgpack
          MessagePack.unpack(data)
        else
          JSON.parse(data.force_encoding(Encoding::UTF_8), max_nesting: false)
        end
      raise ProtocolError, "reply to #{call.func} (request #{call.id}) is not an object: #{data[0, 80].inspect}" unless reply.is_a?(Hash)

      reply
    rescue JSON::ParserError, MessagePack::UnpackError, EOFError, EncodingError => e
      raise ProtocolError, "reply to #{call.func} (request #{call.id}) cannot be decoded: #{e.message}"
    end

    # Waits for the reply to request +id+ queued by somebody else (used by the
    # tests: a reply published before the subscription, then republished).
    def await_reply(id, msgpack: false, timeout: nil)
      timeout ||= self.timeout
      call = Call.new(func: "request #{id}", id: id, msgpack: msgpack, one_way: false, state: :new)
      run(call, now + timeout, timeout)
      decode(call)
    end

    def timeout_error(call, timeout)
      what = call.one_way ? "#{call.func} was not queued" : "no reply to #{call.func}"
      TimeoutError.new("#{what} (request #{call.id || 'without an id yet'}) within #{timeout} s")
    end

    # In a forked child (a preloading app server's worker): the connections,
    # the ids and the calls in flight are the parent's. Leaves the parent's
    # sockets open (closing a TLS one would end its session) and starts afresh.
    def forget_parent
      @pid = Process.pid
      @io_thread = nil # did not survive the fork
      @wake_r = @wake_w = nil
      @sub = @cmd = nil
      @inflight.clear
      @waiters.clear
      @to_push.clear
      @unsubscribe.clear
      @cmd_sent.clear
      @ahead.clear
      @block = @next_block = nil
      @reservation = nil
      @sub_wanted = 0
    end

    # Takes an id, subscribes (or queues the one-way push) and waits for the end
    # of +call+, until +deadline+ at most. Raises its error.
    def run(call, deadline, timeout)
      @lock.synchronize do
        raise ClosedError, "the client is closed" if @closed

        forget_parent if @pid != Process.pid
        start_io_thread
        take_id(call, deadline, timeout)
        call.cond = ConditionVariable.new
        @inflight[call] = true
        begin
          start_call(call)
          until call.done
            seconds = deadline - now
            unless seconds.positive?
              finish(call, timeout_error(call, timeout))
              break
            end
            call.cond.wait(@lock, seconds)
          end
        ensure
          # Interrupted (Timeout.timeout around the call, Thread#raise): forget it.
          finish(call, ClosedError.new("the call was interrupted")) unless call.done
        end
      end
      raise call.error if call.error
    end

    # Subscribes +call+'s channel (unless it was subscribed ahead) or, once it is
    # confirmed, queues its push. Holds the lock.
    def start_call(call)
      json = reply_channel(call.id)
      ahead = call.payload.nil? ? nil : @ahead.delete(json)
      channels = []
      block = @block
      if call.id == block&.next_id&.pred && block.run_id == @sub&.run_id && block.ahead_until - call.id < AHEAD / 2
        # Half the window used: subscribe the next half in one command.
        channels.concat(subscribe_ahead(block, [block.ahead_until, call.id].max + 1, call.id + AHEAD))
      end
      if call.one_way
        @unsubscribe << json if ahead
        call.state = :ready
        @to_push << call
      else
        call.channel = reply_channel(call.id, msgpack: call.msgpack)
        @waiters[call.channel] = call
        if call.msgpack
          @unsubscribe << json if ahead
          ahead = nil
        end
        if ahead.nil?
          call.state = :subscribing
          @unsubscribe.delete(call.channel) # an id seen before a Redis restart
          channels << call.channel
        elsif ahead == :pending
          call.state = :subscribing # its confirmation pushes it
        elsif ahead == call.run_id
          call.state = :ready
          @to_push << call
        else
          finish(call, restarted_error)
        end
      end
      subscribe(channels) if @sub && !channels.empty? # UNSUBSCRIBEs wait for a SUBSCRIBE, or 64 of them
      return if @to_push.empty?

      @cmd ? push_soon : wake
    end

    # Marks the JSON reply channels of ids +first+ to +last+ (of +block+) as
    # subscribed ahead and returns them, to subscribe.
    def subscribe_ahead(block, first, last)
      last = [last, block.last_id].min
      block.ahead_until = last if last > block.ahead_until
      (first..last).map do |id|
        channel = reply_channel(id)
        @ahead[channel] = :pending
        @unsubscribe.delete(channel)
        channel
      end
    end

    # Forgets the blocks of ids and the channels subscribed ahead for them.
    def drop_block
      @block = @next_block = nil
      @unsubscribe.concat(@ahead.keys) if @sub
      @ahead.clear
    end

    # Drops the blocks of ids unless they come from the Redis of +run_id+.
    def keep_blocks_of(run_id)
      drop_block if [@block, @next_block].any? { |block| block && block.run_id != run_id }
    end

    # Reserves the next block before this one runs out, so that no call waits
    # for it.
    def reserve_next(block)
      return if @next_block || @reservation || block.last_id - block.next_id >= ID_BLOCK / 2

      @reservation = Reservation.new(false, false, nil)
      @cmd ? send_reservation : wake
    end

    # Gives +call+ an id from the current block, reserving a new block when none
    # is left or it belongs to another Redis than the subscriber's. Holds the lock
    # (waits release it).
    def take_id(call, deadline, timeout)
      loop do
        raise ClosedError, "the client is closed" if @closed

        if !call.one_way && @sub.nil?
          wait_for_subscriber(call, deadline, timeout)
          next
        end
        if call.id # await_reply: an id of somebody else's, on the subscriber's Redis
          call.run_id = @sub.run_id
          return
        end
        block = @block
        if block && block.next_id <= block.last_id && (call.one_way || block.run_id == @sub.run_id)
          call.id = block.next_id
          call.run_id = block.run_id
          block.next_id += 1
          reserve_next(block)
          return
        end
        if @next_block
          @block = @next_block
          @next_block = nil
          next
        end
        drop_block
        reservation = (@reservation ||= Reservation.new(false, false, nil))
        @cmd ? send_reservation : wake
        until reservation.done
          seconds = deadline - now
          raise timeout_error(call, timeout) unless seconds.positive?

          @changed.wait(@lock, seconds)
        end
        raise reservation.error if reservation.error
      end
    end

    def wait_for_subscriber(call, deadline, timeout)
      failures = @sub_failures
      @sub_wanted += 1
      wake
      begin
        while @sub.nil? && !@closed
          raise ConnectionError, @sub_error.message if @sub_failures != failures

          seconds = deadline - now
          raise timeout_error(call, timeout) unless seconds.positive?

          @changed.wait(@lock, seconds)
        end
      ensure
        @sub_wanted -= 1
      end
    end

    # Ends +call+ with +error+ (or its reply, when nil). Holds the lock.
    def finish(call, error = nil)
      return if call.done

      call.done = true
      call.error = error
      @inflight.delete(call)
      if call.channel && @waiters[call.channel].equal?(call)
        @waiters.delete(call.channel)
        @unsubscribe << call.channel if @sub
      end
      call.cond&.signal
    end

    def fail_all(error)
      @inflight.keys.each { |call| finish(call, error) }
      @to_push.clear
    end

    def fail_reservation(error)
      reservation = @reservation
      return unless reservation

      reservation.done = true
      reservation.error = error
      @reservation = nil
      @changed.broadcast
    end

    # Writes on the subscriber connection: pending UNSUBSCRIBEs, then SUBSCRIBE
    # +channels+. A failure drops the connection (the I/O thread reconnects).
    def subscribe(channels)
      sub = @sub
      sub.queue(["UNSUBSCRIBE", *@unsubscribe]) unless @unsubscribe.empty?
      @unsubscribe.clear
      sub.queue(["SUBSCRIBE", *channels]) unless channels.empty?
      wake unless sub.flush_nonblock
    rescue ConnectionError => e
      lost_sub(sub, e)
    end

    def send_reservation
      reservation = @reservation
      return if reservation.nil? || reservation.sent

      @cmd.queue(["INCRBY", counter_key, ID_BLOCK])
      @cmd_sent << [:reserve, reservation, @cmd.run_id, now]
      reservation.sent = true
      flush_cmd
    end

    # Sends the ready pushes now if Redis has answered every command sent on the
    # command connection; else they go together when it has (see handle_cmd):
    # one at once when calls are few, batches when they are many.
    def push_soon
      push_ready if @cmd_sent.empty?
    end

    # Sends the pushes of every call that is ready: one MSET and one RPUSH.
    def push_ready
      calls = @to_push.reject(&:done)
      @to_push.clear
      calls.select! do |call|
        next true if call.run_id == @cmd.run_id

        finish(call, restarted_error)
        false
      end
      return if calls.empty?

      keys = calls.flat_map { |call| [request_key(call.id), call.payload] }
      @cmd.queue(["MSET", *keys])
      @cmd.queue(["RPUSH", queue_key, *calls.map(&:id)])
      sent = now
      @cmd_sent << [:mset, calls, nil, sent] << [:rpush, calls, nil, sent]
      calls.each { |call| call.state = :pushing }
      flush_cmd
    end

    def flush_cmd
      cmd = @cmd
      wake unless cmd.flush_nonblock
    rescue ConnectionError => e
      lost_cmd(cmd, e)
    end

    def restarted_error
      ConnectionError.new("Redis restarted (its run_id changed) while the call was in flight; it was not sent " \
                          "or its id may be reused")
    end

    # The subscriber connection broke: its calls wait for a reconnect (the I/O
    # thread connects again at once).
    def lost_sub(conn, _error)
      conn.close
      return unless @sub.equal?(conn)

      @sub = nil
      @unsubscribe.clear
      @ahead.clear
      wake
    end

    # The command connection broke: calls whose push was sent on it fail (it may
    # or may not have reached Redis); a reservation is sent again.
    def lost_cmd(conn, error)
      conn.close
      return unless @cmd.equal?(conn)

      @cmd = nil
      lost = ConnectionError.new("lost the connection to Redis while sending the request: #{error.message}")
      @cmd_sent.each do |kind, object, _run_id, _at|
        if kind == :reserve
          object.sent = false
        else
          object.each { |call| finish(call, lost) }
        end
      end
      @cmd_sent.clear
      wake
    end

    # I/O thread.

    def start_io_thread
      return if @io_thread&.alive?

      @wake_r, @wake_w = IO.pipe if @wake_r.nil?
      @io_thread = Thread.new { io_loop }
      @io_thread.name = "cerbas-client-io" if @io_thread.respond_to?(:name=)
      @io_thread.report_on_exception = false
    end

    def wake
      @wake_w&.write_nonblock(".", exception: false)
    rescue IOError
      nil # closed
    end

    def io_loop
      loop do
        want_sub = want_cmd = false
        @lock.synchronize do
          return if @closed

          want_sub = @sub.nil? && (@sub_wanted.positive? || !@waiters.empty?)
          want_cmd = @cmd.nil? && (!@to_push.empty? || (@reservation && !@reservation.sent))
        end
        connect_sub if want_sub
        connect_cmd if want_cmd
        step
      end
    rescue StandardError => e
      # A bug: fail every call rather than leave it waiting (the next call starts
      # a new thread).
      @lock.synchronize do
        error = ProtocolError.new("cerbas client I/O failed: #{e.class}: #{e.message}")
        fail_all(error)
        fail_reservation(error)
        [@sub, @cmd].each { |conn| conn&.close }
        @sub = @cmd = nil
        @cmd_sent.clear
      end
    end

    def connect_sub
      conn = Connection.new(@options, now + socket_timeout)
    rescue ConnectionError, ProtocolError => e
      @lock.synchronize do
        @sub_failures += 1
        @sub_error = e
        @waiters.each_value.to_a.each { |call| finish(call, ConnectionError.new(e.message)) }
        @changed.broadcast
      end
    else
      @lock.synchronize do
        return conn.close if @closed
        if @known_run_id && conn.run_id != @known_run_id
          # Ids may repeat on this Redis: nothing in flight may be resubscribed.
          fail_all(restarted_error)
        end
        @known_run_id = conn.run_id
        keep_blocks_of(conn.run_id)
        @ahead.clear # subscribed on the old connection
        @sub = conn
        @sub_heard = now
        @sub_pinged = nil
        @unsubscribe.clear
        channels = @waiters.keys # still awaited on the same Redis
        channels.concat(subscribe_ahead(@block, @block.next_id, @block.next_id + AHEAD - 1)) if @block
        subscribe(channels)
        @changed.broadcast
      end
    end

    def connect_cmd
      conn = Connection.new(@options, now + socket_timeout, db: db)
    rescue ConnectionError, ProtocolError => e
      @lock.synchronize do
        error = ConnectionError.new(e.message)
        @to_push.each { |call| finish(call, error) }
        @to_push.clear
        fail_reservation(error)
      end
    else
      @lock.synchronize do
        return conn.close if @closed
        @cmd = conn
        keep_blocks_of(conn.run_id)
        send_reservation
        push_ready
      end
    end

    # Waits for something to read or write (or the next deadline), then handles it.
    def step
      sub = cmd = nil
      writers = []
      @lock.synchronize do
        sub = @sub
        cmd = @cmd
        writers << sub.io if sub&.pending_output?
        writers << cmd.io if cmd&.pending_output?
      end
      readers = [@wake_r]
      readers << sub.io if sub
      readers << cmd.io if cmd
      begin
        IO.select(readers, writers, nil, TICK)
      rescue IOError, SystemCallError
        return # a connection was closed meanwhile (close, or a lost one): IOError, or EBADF in select
      end
      @lock.synchronize do
        return if @closed

        @wake_r.read_nonblock(4096, exception: false)
        handle_sub(sub) if sub && @sub.equal?(sub)
        handle_cmd(cmd) if cmd && @cmd.equal?(cmd)
      end
    end

    def handle_sub(sub)
      sub.flush_nonblock
      replies = sub.read_available
      at = now
      if replies.empty?
        if @waiters.empty?
          @sub_heard = at
        elsif @sub_pinged && at - @sub_pinged > socket_timeout
          raise ConnectionError, "Redis did not answer PING within #{socket_timeout} s"
        elsif !@sub_pinged && at - @sub_heard > PING_AFTER
          @sub_pinged = at
          sub.queue(["PING"])
          sub.flush_nonblock
        end
        return
      end
      @sub_heard = at
      @sub_pinged = nil
      replies.each do |reply|
        next unless reply.is_a?(Array)

        case reply[0]
        when "message" then deliver(reply[1], reply[2])
        when "subscribe" then confirmed(reply[1], sub)
        end
      end
      push_soon if @cmd && !@to_push.empty?
      subscribe([]) if @unsubscribe.size >= 64
    rescue ConnectionError, ProtocolError => e
      lost_sub(sub, e)
    end

    def deliver(channel, data)
      call = @waiters[channel]
      return unless call # a republish, or a call that gave up

      call.reply = data
      finish(call)
    end

    def confirmed(channel, sub)
      @ahead[channel] = sub.run_id if @ahead[channel] == :pending
      call = @waiters[channel]
      return unless call&.state == :subscribing

      if call.run_id != sub.run_id
        finish(call, restarted_error)
      elsif call.payload
        call.state = :ready
        @to_push << call
      else
        call.state = :listening
      end
    end

    def handle_cmd(cmd)
      cmd.flush_nonblock
      cmd.read_available.each { |reply| command_reply(reply) }
      push_soon unless @to_push.empty?
      oldest = @cmd_sent.first
      return unless oldest && now - oldest[3] > socket_timeout

      raise ConnectionError, "Redis did not answer within #{socket_timeout} s"
    rescue ConnectionError, ProtocolError => e
      lost_cmd(cmd, e)
    end

    def command_reply(reply)
      kind, object, run_id, = @cmd_sent.shift
      raise ProtocolError, "Redis sent a reply to no command" unless kind

      case kind
      when :reserve
        if reply.is_a?(Integer) && (lift = counter_lift(reply, run_id)).positive?
          @cmd.queue(["INCRBY", counter_key, lift])
          @cmd_sent << [:reserve, object, run_id, now]
          return flush_cmd
        end
        if reply.is_a?(Integer)
          @counter_seen = reply
          @counter_run_id = run_id
          block = IdBlock.new(reply - ID_BLOCK + 1, reply, run_id, reply - ID_BLOCK)
          if @block && @block.next_id <= @block.last_id && @block.run_id == run_id
            @next_block = block # reserved ahead (reserve_next)
          else
            drop_block
            @block = block
          end
          subscribe(subscribe_ahead(block, block.next_id, block.next_id + AHEAD - 1)) if @sub&.run_id == run_id
          object.done = true
          @reservation = nil if @reservation.equal?(object)
          @changed.broadcast
        else
          fail_reservation(ProtocolError.new("INCRBY #{counter_key} failed: #{reply_text(reply)}"))
        end
      when :mset, :rpush
        if reply.is_a?(ErrorReply)
          error = ProtocolError.new("#{kind.upcase} failed: #{reply.message}")
          object.each { |call| finish(call, error) }
        elsif kind == :rpush
          object.each do |call|
            call.state = :pushed unless call.done
            finish(call) if call.one_way
          end
        end
      end
    end

    # How far to lift the counter before taking ids from the block that ends at
    # +reply+: 0 unless Redis restarted (another run_id) or the counter went
    # back. Then the server may still republish replies of the old ids for a few
    # seconds, now on this Redis, and a call must not get one: the block must
    # start past every id this client saw, and past what other clients may have
    # reserved after it (COUNTER_LIFT).
    def counter_lift(reply, run_id)
      return 0 unless @counter_seen
      return 0 if run_id == @counter_run_id && reply - ID_BLOCK >= @counter_seen

      [@counter_seen + COUNTER_LIFT - (reply - ID_BLOCK), 0].max
    end

    def reply_text(reply) = reply.is_a?(ErrorReply) ? reply.message : reply.inspect
  end
end
