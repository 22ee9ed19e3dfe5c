#!/usr/bin/env escript
%% Run one supervision scenario under Erlang/OTP's own `supervisor` and print what happened,
%% one event per line, for tests/integration/test_otp_conformance.py to compare with ours.
%%
%% Usage: otp_scenario.erl STRATEGY MAX_R CHILDREN STEP...
%%   STRATEGY  one_for_one | one_for_all | rest_for_one
%%   MAX_R     intensity (restarts allowed within a 3600 s period)
%%   CHILDREN  comma-separated id:restart[:failinit] (failinit: init fails on every restart)
%%   STEP      crash:ID | exit:ID | terminate:ID | shutdown:all
%% Output lines: "start ID", "stop ID", "fail ID" (init refused), "escalated", "shut down", and at the end
%% "final ID STATE" for each child (running | stopped).
-module(otp_scenario).
-mode(compile).
-export([main/1, init/1, start_child/2, handle_cast/2, handle_call/3, terminate/2]).

main([Strategy, MaxR, Children | Steps]) ->
    logger:set_primary_config(level, none),  % crash reports would mix with our lines
    process_flag(trap_exit, true),
    Specs = [parse_child(C) || C <- string:tokens(Children, ",")],
    {ok, Sup} = supervisor:start_link(?MODULE, {sup, list_to_atom(Strategy),
                                                list_to_integer(MaxR), Specs}),
    Result = run(Sup, Steps),
    case Result of
        escalated -> out("escalated");
        shut_down -> out("shut down");
        ok ->
            [out(io_lib:format("final ~s ~s", [Id, child_state(Pid)]))
             || {Id, Pid, _, _} <- lists:reverse(supervisor:which_children(Sup))]
    end,
    halt(0).

parse_child(Text) ->
    case string:tokens(Text, ":") of
        [Id, Restart] -> {Id, list_to_atom(Restart), false};
        [Id, Restart, "failinit"] -> {Id, list_to_atom(Restart), true}
    end.

child_state(Pid) when is_pid(Pid) -> "running";
child_state(_) -> "stopped".

run(_Sup, []) -> ok;
run(Sup, [Step | Rest]) ->
    [Action, Id] = string:tokens(Step, ":"),
    case Action of
        "shutdown" ->
            exit(Sup, shutdown),
            receive {'EXIT', Sup, _} -> ok end;
        "terminate" -> ok = supervisor:terminate_child(Sup, Id);
        _ -> gen_server:cast(pid_of(Sup, Id), list_to_atom(Action))
    end,
    case Action of
        "shutdown" -> shut_down;
        _ ->
            receive
                {'EXIT', Sup, _} -> escalated
            after 300 -> run(Sup, Rest)
            end
    end.

pid_of(Sup, Id) ->
    {Id, Pid, _, _} = lists:keyfind(Id, 1, supervisor:which_children(Sup)),
    Pid.

out(Line) -> io:format("~s~n", [Line]).

%% supervisor and gen_server callbacks share this module: init/1 tells them apart.
init({sup, Strategy, MaxR, Specs}) ->
    Children = [#{id => Id, start => {?MODULE, start_child, [Id, FailInit]},
                  restart => Restart, shutdown => 5000, type => worker}
                || {Id, Restart, FailInit} <- Specs],
    {ok, {#{strategy => Strategy, intensity => MaxR, period => 3600}, Children}};
init({child, Id, FailInit}) ->
    process_flag(trap_exit, true),
    Started = get_started(Id),
    case FailInit andalso Started > 0 of
        true -> out("fail " ++ Id), {stop, init_failed};
        false -> put_started(Id, Started + 1), out("start " ++ Id), {ok, Id}
    end.

start_child(Id, FailInit) -> gen_server:start_link(?MODULE, {child, Id, FailInit}, []).

%% how many times each child started, kept in a public ETS table owned by a helper process
get_started(Id) ->
    ensure_table(),
    case ets:lookup(otp_scenario_starts, Id) of [{_, N}] -> N; [] -> 0 end.

put_started(Id, N) -> ets:insert(otp_scenario_starts, {Id, N}).

ensure_table() ->
    case ets:info(otp_scenario_starts) of
        undefined ->
            Parent = self(),
            spawn(fun() ->
                ets:new(otp_scenario_starts, [named_table, public]),
                Parent ! table_ready,
                receive never -> ok end
            end),
            receive table_ready -> ok end;
        _ -> ok
    end.

handle_cast(crash, State) -> erlang:error({injected_crash, State});
handle_cast(exit, State) -> {stop, normal, State}.

handle_call(_, _, State) -> {reply, ok, State}.

terminate(_Reason, Id) -> out("stop " ++ Id).
