# frozen_string_literal: true

# One Redis connection speaking RESP2 over a socket (TCP, TLS or unix), with a
# deadline on every blocking step and non-blocking reads and writes for the
# client's I/O thread. Not for deciding what to send or what a reply means: the
# Client does that; and not thread-safe by itself (the Client holds its lock
# around every use).

require "socket"

module CerbasClient
  # An error reply of Redis (<tt>-ERR ...</tt>), returned, not raised: the caller
  # decides which of its calls it fails.
  ErrorReply = Struct.new(:message)

  # A connected, authenticated Redis connection (see the file comment).
  class Connection
    CRLF = "\r\n"
    NONE = Object.new.freeze # parse: no complete reply in the buffer yet
    READ_CHUNK = 65_536

    # The INFO server run_id of the Redis this connection reached: it changes
    # when Redis restarts.
    attr_reader :run_id

    # The RESP encoding of one command.
    def self.encode(args)
      out = String.new("*#{args.size}\r\n", encoding: Encoding::BINARY)
      args.each do |arg|
        arg = arg.to_s
        out << "$" << arg.bytesize.to_s << CRLF << arg.b << CRLF
      end
      out
    end

    # Connects (before +deadline+, a monotonic time), authenticates, selects +db+
    # (unless nil) and reads run_id. Raises ConnectionError.
    def initialize(options, deadline, db: nil)
      @in = String.new(capacity: READ_CHUNK, encoding: Encoding::BINARY)
      @chunk = String.new(capacity: READ_CHUNK, encoding: Encoding::BINARY)
      @pos = 0
      @out = String.new(encoding: Encoding::BINARY)
      @where = options[:path] || "#{options[:host]}:#{options[:port]}"
      @io = open_socket(options, deadline)
      setup = []
      if options[:password]
        setup << ["AUTH", *options[:username], options[:password]]
      end
      setup << ["SELECT", db] if db
      setup << %w[INFO server]
      setup.each { |args| queue(args) }
      flush(deadline)
      replies = setup.map { read(deadline) }
      failed = replies.index { |r| r.is_a?(ErrorReply) }
      raise ConnectionError, "Redis at #{@where} refused #{setup[failed][0]}: #{replies[failed].message}" if failed

      @run_id = replies.last.to_s[/^run_id:(\h+)/, 1]
      raise ProtocolError, "Redis at #{@where} named no run_id in INFO server" unless @run_id
    rescue SystemCallError, IOError, SocketError, ConnectionError, ProtocolError => e
      close
      raise e if e.is_a?(Error)

      raise ConnectionError, "cannot connect to Redis at #{@where}: #{e.message} (#{e.class})"
    rescue StandardError => e
      close
      raise e unless defined?(OpenSSL::SSL::SSLError) && e.is_a?(OpenSSL::SSL::SSLError)

      raise ConnectionError, "cannot connect to Redis at #{@where}: #{e.message} (#{e.class})"
    end

    # The socket, for IO.select.
    def io = @io.to_io

    def close
      @io&.close
    rescue IOError, SystemCallError
      nil # already closed
    end

    def closed? = @io.nil? || @io.closed?

    # Adds a command to the output buffer (send it with #flush_nonblock or #flush).
    def queue(args)
      @out << Connection.encode(args)
    end

    def pending_output? = !@out.empty?

    # Writes what the socket takes now; true when nothing is left to write.
    def flush_nonblock
      until @out.empty?
        written = @io.write_nonblock(@out, exception: false)
        return false if written.is_a?(Symbol) # :wait_writable (or :wait_readable for TLS)

        @out = written == @out.bytesize ? @out.clear : @out.byteslice(written..)
      end
      true
    rescue IOError, SystemCallError => e
      raise ConnectionError, "lost the connection to Redis at #{@where}: #{e.message} (#{e.class})"
    end

    # Writes everything, waiting until +deadline+ at most.
    def flush(deadline)
      wait(deadline, :write) until flush_nonblock
    end

    # One reply, waiting until +deadline+ at most.
    def read(deadline)
      loop do
        reply = parse_one
        return reply unless reply.equal?(NONE)

        wait(deadline, :read) unless fill
      end
    end

    # Every complete reply that has arrived, without waiting.
    def read_available
      replies = []
      loop do
        reply = parse_one
        if reply.equal?(NONE)
          break unless fill

          next
        end
        replies << reply
      end
      replies
    end

    private

    def now = Process.clock_gettime(Process::CLOCK_MONOTONIC)

    def open_socket(options, deadline)
      return Socket.unix(options[:path]) if options[:path]

      sock = Socket.tcp(options[:host], options[:port], connect_timeout: left(deadline))
      sock.setsockopt(Socket::IPPROTO_TCP, Socket::TCP_NODELAY, 1)
      return sock unless options[:ssl]

      require "openssl"
      context = OpenSSL::SSL::SSLContext.new
      context.set_params(options[:ssl_params] || {})
      ssl = OpenSSL::SSL::SSLSocket.new(sock, context)
      ssl.hostname = options[:host]
      ssl.sync_close = true
      @io = ssl # closed on a failure below
      loop do
        case ssl.connect_nonblock(exception: false)
        when :wait_readable then wait(deadline, :read)
        when :wait_writable then wait(deadline, :write)
        else return ssl
        end
      end
    end

    def left(deadline)
      seconds = deadline - now
      raise ConnectionError, "Redis at #{@where} did not answer in time" unless seconds.positive?

      seconds
    end

    def wait(deadline, what)
      seconds = left(deadline)
      ready = what == :read ? @io.to_io.wait_readable(seconds) : @io.to_io.wait_writable(seconds)
      raise ConnectionError, "Redis at #{@where} did not answer in time" unless ready
    end

    # Reads what has arrived into the input buffer; false when nothing had.
    def fill
      chunk = @io.read_nonblock(READ_CHUNK, @chunk, exception: false)
      return false if chunk.is_a?(Symbol)
      raise ConnectionError, "Redis at #{@where} closed the connection" if chunk.nil?

      @in << chunk
      true
    rescue IOError, SystemCallError => e
      raise ConnectionError, "lost the connection to Redis at #{@where}: #{e.message} (#{e.class})"
    end

    def parse_one
      parsed = parse(@pos)
      return NONE unless parsed

      @pos = parsed[1]
      if @pos == @in.bytesize
        @in.clear
        @pos = 0
      elsif @pos > READ_CHUNK
        @in = @in.byteslice(@pos..)
        @pos = 0
      end
      parsed[0]
    end

    # The reply starting at byte +pos+ of the input buffer and the position after
    # it, or nil when it is not complete yet.
    def parse(pos)
      eol = @in.index(CRLF, pos) or return nil
      line = @in.byteslice(pos + 1, eol - pos - 1)
      after = eol + 2
      case @in.getbyte(pos)
      when 43 then [line, after] # +
      when 45 then [ErrorReply.new(line.force_encoding(Encoding::UTF_8)), after] # -
      when 58 then [Integer(line, 10), after] # :
      when 36 # $
        size = Integer(line, 10)
        return [nil, after] if size.negative?
        return nil if @in.bytesize < after + size + 2

        [@in.byteslice(after, size), after + size + 2]
      when 42 # *
        count = Integer(line, 10)
        return [nil, after] if count.negative?

        items = Array.new(count)
        count.times do |i|
          item = parse(after) or return nil
          items[i], after = item
        end
        [items, after]
      else
        raise ProtocolError, "Redis at #{@where} sent something that is not RESP: #{line[0, 40].inspect}"
      end
    rescue ArgumentError
      raise ProtocolError, "Redis at #{@where} sent a malformed length: #{line[0, 40].inspect}"
    end
  end
end
