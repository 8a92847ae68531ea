# frozen_string_literal: true

# A Ruby client for cerbas, the Redis-backed job server (wire protocol:
# docs/PROTOCOL.md). A client needs nothing but Redis. To call a function it
#
# 1. <tt>INCR P-COUNTER</tt> to get a request id;
# 2. subscribes, on a connection of its own, to the reply channel
#    <tt>P-RESPONSE-{db}-{id:010}</tt> (or <tt>MSGPACK:P-RESPONSE-{db}-{id:010}</tt>
#    for a msgpack reply) and waits until Redis confirms the subscription;
# 3. in one pipeline, <tt>SET P-REQ-{id:010}</tt> to the JSON body
#    <tt>{"func", "args", "user", "source"}</tt> and <tt>RPUSH P-QUEUE id</tt>;
# 4. waits, up to its timeout, for the one message on that channel:
#    <tt>{"status" => "ok", "data" => ...}</tt> or
#    <tt>{"status" => "error", "data" => "message"}</tt>.
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
#   c.request("hello")                    # => {"status"=>"ok", "data"=>"hello world!"}
#   c.request("sum", {"a" => 1, "b" => 2}) # => {"status"=>"ok", "data"=>3}
#   c.request("hello", msgpack: true)     # the same reply, sent as msgpack
#   c.send_one_way("tally", {"name" => "x"}) # queued, no reply published; => the id
#   begin
#     c.request("sleep", {"ms" => 3000}, timeout: 0.5)
#   rescue CerbasClient::Timeout => e
#     puts e.message
#   end
#   c.close
#
# Errors of Redis itself (a server that is down, a wrong password) are raised as
# the redis gem's Redis::BaseError subclasses. A client may be shared by threads:
# each request subscribes on a connection of its own.
#
# Dependencies: the redis gem (4.x API; Debian's ruby-redis) and msgpack
# (ruby-msgpack).

require "json"
require "msgpack"
require "redis"
require "uri"

module CerbasClient
  DEFAULT_URL = "redis://127.0.0.1:6379"
  DEFAULT_ENV = "dev"
  DEFAULT_PREFIX = "CERBAS"
  ENV_DBS = { "dev" => 1, "prod" => 8 }.freeze

  # No reply arrived before the request's timeout.
  class Timeout < StandardError; end

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
  #
  # +user+ and +source+ are sent with every request unless a call names others;
  # they must be registered in the server's configuration. +timeout+ (seconds) is
  # how long a request waits for its reply unless a call names another.
  class Client
    attr_reader :url, :env, :db, :prefix, :user, :source, :timeout, :redis

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

    def initialize(url: nil, env: nil, prefix: DEFAULT_PREFIX, user: "test", source: "test", timeout: 10.0)
      @url, @env, @db = CerbasClient.resolve(url: url, env: env)
      @prefix = prefix
      @user = user
      @source = source
      @timeout = timeout
      @redis = connect # lazy: the redis gem connects on the first command
    end

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

    # Calls +func+ with +args+ (a Hash) and returns the reply Hash
    # <tt>{"status" => "ok" | "error", "data" => ...}</tt>. Raises
    # CerbasClient::Timeout when no reply arrives within +timeout+ seconds
    # (default: the client's). The timeout bounds the wait for the subscription,
    # then starts over for the wait for the reply once the request is queued, so
    # a timeout can come later by the Redis round trips of subscribing and
    # queuing (about a millisecond on a local Redis).
    def request(func, args = nil, msgpack: false, user: nil, source: nil, timeout: nil, delay: nil)
      timeout ||= self.timeout
      deadline = now + timeout
      payload = body(func, args, user: user, source: source, delay: delay)
      id = redis.incr(counter_key)
      channel = reply_channel(id, msgpack: msgpack)
      reply = nil
      listening = true # false while pushing, whose Redis errors are not timeouts
      listener = connect(reconnect_attempts: 0) # a subscribed connection is busy
      begin
        listener.subscribe_with_timeout(left(deadline, func, id, timeout), channel) do |on|
          # Redis confirmed the subscription: only now can the reply not be missed.
          on.subscribe do
            listening = false
            push(id, payload)
            listening = true
            left(deadline, func, id, timeout)
          end
          # A republish may bring the reply twice: keep the first.
          on.message do |_channel, data|
            reply ||= data
            listener.unsubscribe
          end
        end
      rescue Redis::TimeoutError
        raise unless listening

        raise Timeout, "no reply to #{func} (request #{id}) within #{timeout} s"
      ensure
        listener.close
      end
      raise Timeout, "no reply to #{func} (request #{id})" if reply.nil?

      msgpack ? MessagePack.unpack(reply.b) : JSON.parse(reply.dup.force_encoding(Encoding::UTF_8), max_nesting: false)
    end

    # Queues a one-way call (nobody waits for its reply, and the server publishes
    # none: the body says <tt>"reply": false</tt>); returns its id.
    def send_one_way(func, args = nil, user: nil, source: nil, delay: nil)
      payload = body(func, args, user: user, source: source, delay: delay, reply: false)
      id = redis.incr(counter_key)
      push(id, payload)
      id
    end

    def close
      redis.close
    end

    private

    def connect(**extra)
      if CerbasClient.unix?(url)
        uri = URI(url.sub(/\Aredis\+unix:/, "unix:"))
        options = { path: uri.path }
        options[:password] = URI.decode_www_form_component(uri.password) if uri.password && !uri.password.empty?
      else
        options = { url: url }
      end
      Redis.new(**options, db: db, **extra)
    end

    def push(id, payload)
      redis.pipelined do |pipeline|
        pipeline.set(request_key(id), payload)
        pipeline.rpush(queue_key, id)
      end
    end

    def now = Process.clock_gettime(Process::CLOCK_MONOTONIC)

    # Seconds left before +deadline+; Timeout when none.
    def left(deadline, func, id, timeout)
      seconds = deadline - now
      raise Timeout, "no reply to #{func} (request #{id}) within #{timeout} s" unless seconds.positive?

      seconds
    end
  end
end
